"""``armdi bench mdi-vs-ddi`` on the tiny model: every case runs, each row has its
measurement beside its prediction, and the emulation is said."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from appliance.bench import write_json
from appliance.bench_mdi_ddi import MdiDdiOptions, format_report, parse_size, run_mdi_ddi_bench
from appliance.report import mdi_cells
from engines.errors import ArmdiError
from tests.conftest import BuiltModel


def test_a_tiny_sweep_measures_every_mode_beside_its_prediction(built_tiny: BuiltModel,
                                                                tmp_path: Path) -> None:
    options = MdiDdiOptions(repo=built_tiny.repo, models=("tiny",), sizes=(8,),
                            links_mbps=(50.0,), workers=(2,),
                            modes=("armdi", "edgepipe", "ddi", "ddi_jpeg", "local", "auto"),
                            wire_dtypes=("float32", "float16"), images=6, window=3, warmup=1,
                            build_missing=False)
    result = run_mdi_ddi_bench(options)
    rows = result["cells"]
    cases = sorted((r["mode"], r["wire_dtype"]) for r in rows)
    assert cases == sorted([("local", "float32"), ("armdi", "float32"), ("armdi", "float16"),
                            ("edgepipe", "float32"), ("edgepipe", "float16"),
                            ("ddi", "float32"), ("ddi_jpeg", "float32"),
                            ("auto", "float32")])
    for r in rows:
        assert r["failed"] == 0 and r["time_s"] > 0
        assert r["predicted"]["time_s"] > 0 and r["time_ratio"] > 0
    jpeg = next(r for r in rows if r["mode"] == "ddi_jpeg")
    pixels = next(r for r in rows if r["mode"] == "ddi")
    assert pixels["input_bytes"] == 3 * 8 * 8 and jpeg["input_bytes"] > 0
    assert "links emulated in the transport" in result["emulation"]
    assert "emulated compute" in result["emulation"]
    assert len(result["winners"]) == 1
    auto = next(r for r in rows if r["mode"] == "auto")  # the source's own choice, and why
    assert auto["auto_choice"] in ("ddi", "armdi") and "predicted fastest" in auto["auto_reason"]
    [summary] = result["auto"]["cells"]
    assert summary["chose"] == auto["auto_choice"] and summary["ratio_to_best"] > 0
    assert result["auto"]["min_ratio_to_best"] == summary["ratio_to_best"]
    assert result["calibration"]["tiny"]["overhead_ms"] > 0  # measured, not assumed
    report = format_report(result)
    assert "links emulated in the transport" in report and "ddi_jpeg" in report
    assert len(mdi_cells(result)) == len(rows) - 1  # armdi bench report reads them (not local)
    write_json(result, tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text())["bench"] == "mdi-vs-ddi"


def test_a_memory_budget_rules_out_whole_model_modes_and_chains_respect_it(
        built_tiny: BuiltModel) -> None:
    blocks = built_tiny.manifest.blocks
    options = MdiDdiOptions(repo=built_tiny.repo, models=("tiny",), sizes=(8,),
                            links_mbps=(50.0,), workers=(4,),
                            modes=("edgepipe", "ddi", "hybrid", "local", "auto"),
                            wire_dtypes=("float32",), images=6, window=3, warmup=1,
                            build_missing=False, memory=(0.6, 0.2))
    result = run_mdi_ddi_bench(options)
    rows = result["cells"]
    [skipped] = result["skipped"]  # at 0.2, four workers cannot hold the model between them
    assert skipped["memory"] == 0.2 and "cannot hold" in skipped["why"]
    assert sorted(r["mode"] for r in rows) == ["auto", "edgepipe", "hybrid"]  # no device
    cap = int(blocks * 0.6)  # holds the model: ddi and local cannot run
    for r in rows:
        assert r["failed"] == 0 and r["memory"] == 0.6 and r["max_blocks"] == cap
        assert all(b - a <= cap for a, b in zip(r["boundaries"][1:], r["boundaries"][2:],
                                                strict=False)) or r["mode"] != "edgepipe"
    hybrid = next(r for r in rows if r["mode"] == "hybrid")
    length, chains = hybrid["chain_workers"], hybrid["predicted"]["chains"]
    assert length in (2, 3) and chains[0] == list(range(length))  # the best length predicted
    assert all(len(c) * cap >= blocks for c in chains)  # each chain holds the model
    [summary] = result["auto"]["cells"]
    assert summary["memory"] == 0.6 and summary["ratio_to_local"] is None
    assert summary["chose"] in ("armdi", "hybrid")
    [winner] = result["winners"]
    assert winner["memory"] == 0.6 and winner["measured"] in ("edgepipe", "hybrid")
    assert "memory 0.6" in format_report(result)


def test_a_slow_device_is_its_own_condition(built_tiny: BuiltModel) -> None:
    options = MdiDdiOptions(repo=built_tiny.repo, models=("tiny",), sizes=(8,),
                            links_mbps=(50.0,), workers=(2,), modes=("ddi", "edgepipe"),
                            wire_dtypes=("float32",), images=4, window=2, warmup=1,
                            build_missing=False, slow=(1.0, 8.0))
    result = run_mdi_ddi_bench(options)
    rows = {(r["mode"], r["slow"]): r for r in result["cells"]}
    assert sorted(rows) == [("ddi", 1.0), ("ddi", 8.0), ("edgepipe", 1.0), ("edgepipe", 8.0)]
    assert all(r["failed"] == 0 for r in rows.values())
    # DDI's pace is the workers' side by side: one 8x slower adds less than it takes away
    alike, slow = rows[("ddi", 1.0)]["predicted"], rows[("ddi", 8.0)]["predicted"]
    assert slow["bottleneck_ms"] >= alike["bottleneck_ms"]
    assert len(result["winners"]) == 2 and {w["slow"] for w in result["winners"]} == {1.0, 8.0}
    assert "last worker 8x slower" in format_report(result)
    with pytest.raises(ArmdiError, match="--slow"):
        run_mdi_ddi_bench(dataclasses.replace(options, slow=(0.5,)))


def test_bad_options_are_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ArmdiError, match="--modes"):
        run_mdi_ddi_bench(MdiDdiOptions(repo=tmp_path, modes=("mesh",)))
    with pytest.raises(ArmdiError, match="--memory"):
        run_mdi_ddi_bench(MdiDdiOptions(repo=tmp_path, memory=(1.5,)))
    with pytest.raises(ArmdiError, match="--link 'netns'"):  # transport | tc
        run_mdi_ddi_bench(MdiDdiOptions(repo=tmp_path, link="netns"))
    with pytest.raises(ArmdiError, match="not built"):
        run_mdi_ddi_bench(MdiDdiOptions(repo=tmp_path, models=("vgg16",), sizes=(32,),
                                        build_missing=False))


def test_sizes_take_camera_frames_and_a_square_only_model_is_skipped(tmp_path: Path) -> None:
    assert [parse_size(t) for t in ("224", "720x1280", "32x32")] == [224, (720, 1280), 32]
    for bad in ("720x", "a", "1x2x3"):
        with pytest.raises(ArmdiError, match="--sizes"):
            parse_size(bad)
    with pytest.raises(ArmdiError, match="--sizes"):
        run_mdi_ddi_bench(MdiDdiOptions(repo=tmp_path, sizes=((4, 720),)))
    result = run_mdi_ddi_bench(MdiDdiOptions(repo=tmp_path, models=("efficientnet_lite0",),
                                             sizes=((64, 96),), calibrate=False))
    assert result["cells"] == [] and result["options"]["sizes"] == ["64x96"]
    [skipped] = result["skipped"]
    assert skipped["size"] == "64x96" and "square" in skipped["why"]
    with pytest.raises(ArmdiError, match="--input-size 64x96"):  # says how to build it
        run_mdi_ddi_bench(MdiDdiOptions(repo=tmp_path, models=("mobilenet_v2",),
                                        sizes=((64, 96),), build_missing=False))
