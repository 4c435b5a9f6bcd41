"""``armdi bench report`` from small fixture JSONs: every section, the plots, the notes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from appliance.report import ReportOptions, command_of, generate, mdi_cells, win_map
from engines.errors import ArmdiError

MACHINE = {"cpu_count": 2, "cpu_model": "Test CPU", "platform": "Linux-test",
           "python": "3.11", "onnxruntime": "1.0", "pynng": "0.9"}
TEMPLATE = """# Benchmarks

Hand-written prose stays.

{{commands}}

## Machine
{{ machine }}

## Emulation
{{emulation}}

## Pipeline
{{pipeline}}

## Adaptive
{{adaptive}}

## Faults
{{faults}}

## MDI vs DDI
{{mdi_vs_ddi}}

## Win map
{{win_map}}
"""


def _timing(ips: float) -> dict[str, Any]:
    return {"throughput_ips": ips, "p50_ms": 10.0, "p99_ms": 12.0, "compute_p50_ms": 9.0,
            "overhead_p50_ms": 1.0}


def pipeline() -> dict[str, Any]:
    return {
        "command": "armdi bench pipeline --requests 20 --repeats 1 --json x.json",
        "model": "tiny", "machine": MACHINE, "load_avg": {"start": [0.5], "end": [0.7]},
        "settings": {"requests": 20, "repeats": 1, "window": 8, "warmup": 3},
        "emulation": "workers pinned; links: 20 Mbit/s per node, shaped with tc tbf",
        "link": {"spec": "20mbit", "mbps": 20.0, "delay_ms": 0.0,
                 "how": "links: 20 Mbit/s per node, shaped with tc tbf",
                 "shaped_with_tc": True},
        "direct": _timing(100.0),
        "pipeline_1node": {"label": "1 worker (not pinned)", "boundaries": [0, 0, 11],
                           **_timing(90.0)},
        "pipeline_2node": {"label": "2 workers, CPUs 0|1, static boundary",
                           "boundaries": [0, 0, 5, 11], **_timing(150.0)},
        "transfer": {"bytes": 192, "raw_ms": 0.1, "frame_ms": 0.13},
        "summary": {"overhead_1node": 1.2, "goals": {"overhead_1node": "<= 1.1"},
                    "met": {"overhead_1node": False}},
    }


def adaptive() -> dict[str, Any]:
    run = {"mode": "armdi", "scenario": "b/c: w2 1x -> 4x", "throughput_per_s": [10, 12, 8],
           "optimum_ips": [12.0, 12.0, 9.0], "p50_ms": 100.0, "p99_ms": 200.0, "moves": 2,
           "failed_requests": 0}
    return {"model": "tiny", "machine": MACHINE, "emulation": "emulated compute: x 4",
            "settings": {"model": "tiny", "workers": 3, "duration_s": 3.0,
                         "time_scale": 4.0, "modes": ["armdi", "edgepipe"],
                         "scenarios": ["bc"], "emulate": True},
            "runs": {"bc/armdi": run, "bc/edgepipe": {**run, "mode": "edgepipe", "moves": 0}},
            "summary": {"recovery_s": 1.0, "recovery_s_edgepipe": None}}


def faults() -> dict[str, Any]:
    runs = [{"mode": mode, "fault": fault, "sent": 10, "returned": 10, "lost": 0,
             "duplicated": 0, "wrong": 0, "longest_stall_s": 0.4,
             "throughput_per_s": [5, 6, 0, 5], "optimum_ips": [math.nan, 6.0]}
            for fault in ("kill_middle", "pause_3s") for mode in ("armdi", "edgepipe")]
    return {"model": "tiny", "machine": MACHINE,
            "settings": {"duration_s": 4.0, "fault_s": 2.0, "compute": "real"}, "runs": runs}


def mdi_vs_ddi() -> dict[str, Any]:
    cells = []
    for link in (20, 1000):
        for mode, t in (("armdi", 2.0 if link == 20 else 1.0), ("edgepipe", 2.5),
                        ("ddi", 4.0 if link == 20 else 0.5), ("local", 3.0)):
            cells.append({"model": "tiny", "input_size": 224, "link_mbps": link,
                          "workers": 2, "mode": mode, "wire_dtype": "float32", "time_s": t,
                          "throughput_ips": 100 / t, "p50_ms": 10.0,
                          "predicted": {"time_s": t * 0.9}})
    cells.append({"model": "tiny", "input_size": [32, 32], "link_mbps": 20, "workers": 2,
                  "mode": "ddi", "images": 100, "throughput_ips": 50.0})
    return {"machine": {**MACHINE, "cpu_model": "Other CPU"},
            "emulation": "links emulated in the transport; emulated compute", "cells": cells}


def write(directory: Path, **files: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / f"{name.replace('_', '-')}.json").write_text(json.dumps(data))
    return directory


def test_report_has_every_section_and_the_plots(tmp_path: Path) -> None:
    results = write(tmp_path / "results", pipeline=pipeline(), adaptive=adaptive(),
                    faults=faults(), mdi_vs_ddi=mdi_vs_ddi())
    template = tmp_path / "template.md"
    template.write_text(TEMPLATE)
    out = tmp_path / "docs" / "benchmarks.md"
    report = generate(ReportOptions(results=results, template=template, out=out))
    page = out.read_text()
    assert report.missing == [] and "{{" not in page
    assert "Hand-written prose stays." in page
    # the exact commands: recorded by the bench, or rebuilt from the settings
    assert "armdi bench pipeline --requests 20 --repeats 1 --json x.json" in page
    assert "armdi bench adaptive --model tiny --workers 3" in page
    assert "--scenarios bc" in page and "armdi bench report --out" in page
    # the machine, per file where they differ; what rests on emulation
    assert "2 x Test CPU" in page and "2 x Other CPU" in page
    assert "shaped with tc tbf" in page and "emulated compute: x 4" in page
    assert "links emulated in the transport" in page
    # tables: a cell with a | does not break its row
    assert "CPUs 0\\|1" in page
    assert "| `overhead_1node` | 1.20 | <= 1.1 | no |" in page
    assert "| bc / armdi | 10.00 | 11.00 |" in page
    assert "| armdi / kill_middle | 10 | 10 | 0 |" in page
    assert "predicted s" in page and "| tiny | 224x224 | 2 | 20 | armdi | 2.00 |" in page
    assert "| tiny, 224x224, 2 workers | MDI x2.00 | DDI x2.00 |" in page
    names = sorted(p.name for p in report.plots)
    assert names == ["adaptive.png", "faults.png", "mdi-vs-ddi.png", "win-map.png"]
    for png in report.plots:
        assert png.parent == out.parent / "plots"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/{png.name})" in page


def test_missing_results_are_noted_not_fatal(tmp_path: Path) -> None:
    results = write(tmp_path / "results", pipeline=pipeline())
    template = tmp_path / "t.md"
    template.write_text(TEMPLATE)
    report = generate(ReportOptions(results=results, template=template,
                                    out=tmp_path / "page.md"))
    page = (tmp_path / "page.md").read_text()
    assert report.missing == ["adaptive.json", "faults.json", "mdi-vs-ddi.json"]
    assert "_Not measured: no `mdi-vs-ddi.json`" in page
    assert "armdi bench mdi-vs-ddi --json docs/results/mdi-vs-ddi.json" in page
    assert report.plots == []


def test_bad_inputs_get_clear_errors(tmp_path: Path) -> None:
    results = write(tmp_path / "results")
    template = tmp_path / "t.md"
    template.write_text("{{pipeline}} {{tables}}")
    with pytest.raises(ArmdiError, match="unknown sections: tables"):
        generate(ReportOptions(results=results, template=template, out=tmp_path / "o.md"))
    with pytest.raises(ArmdiError, match="no such results directory"):
        generate(ReportOptions(results=tmp_path / "nope", template=template,
                               out=tmp_path / "o.md"))
    (results / "faults.json").write_text("{not json")
    template.write_text("x")
    with pytest.raises(ArmdiError, match=r"faults\.json: not a bench result"):
        generate(ReportOptions(results=results, template=template, out=tmp_path / "o.md"))


def test_win_map_compares_the_best_of_each_side() -> None:
    ratios = win_map(mdi_cells(mdi_vs_ddi()))
    assert ratios == {("tiny", "224x224", 2): {20.0: 2.0, 1000.0: 0.5}}


def test_mdi_cells_reads_sizes_and_derives_time() -> None:
    cells = mdi_cells(mdi_vs_ddi())
    small = [c for c in cells if c.input == "32x32"]
    assert len(small) == 1 and small[0].time_s == 2.0 and small[0].predicted_time_s is None


def test_command_rebuilt_from_settings() -> None:
    assert command_of("faults", faults()) == (
        "armdi bench faults --model tiny --duration 4.0 --modes armdi,edgepipe "
        "--json docs/results/faults.json")


def test_the_cli_writes_the_page(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from appliance.cli import app

    results = write(tmp_path / "results", faults=faults())
    template = tmp_path / "t.md"
    template.write_text("{{faults}}")
    out = tmp_path / "page.md"
    result = CliRunner().invoke(app, ["bench", "report", "--results", str(results),
                                      "--template", str(template), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "note: no mdi-vs-ddi.json" in result.output and f"wrote {out}" in result.output
    assert "kill_middle" in out.read_text() and (tmp_path / "plots" / "faults.png").exists()


def test_the_repository_page_is_generated_from_its_template() -> None:
    """docs/benchmarks.md is what `armdi bench report` makes of the committed results."""
    root = Path(__file__).resolve().parents[2]
    template = (root / "docs" / "benchmarks.template.md").read_text()
    page = (root / "docs" / "benchmarks.md").read_text()
    assert "{{" not in page
    head = template.split("{{", 1)[0]
    assert page.startswith(head)


def test_repeated_pipeline_runs_and_companions_are_tabled(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    for i, overhead in enumerate((1.30, 1.10, 1.20), start=1):
        data = pipeline()
        data["summary"] = {"overhead_1node": overhead, "hop_cost_ratio": 1.3,
                           "speedup_2node": 1.7 + i / 100, "cpu_ratio": 1.05,
                           "overhead_1node_ms": overhead - 1,
                           "goals": {"overhead_1node": "<= 1.1"}, "met": {}}
        (results / f"pipeline-run{i}.json").write_text(json.dumps(data))
    (results / "faults-emulated.json").write_text(json.dumps(faults()))
    template = tmp_path / "t.md"
    template.write_text("{{pipeline_runs}}\n\n{{faults_emulated}}\n\n{{pipeline_old}}\n\n"
                        "{{commands}}\n{{machine}}\n")
    out = tmp_path / "page" / "b.md"
    generate(ReportOptions(results=results, template=template, out=out))
    page = out.read_text()
    median_row = next(line for line in page.splitlines() if "median of 3" in line)
    assert "1.2" in median_row and "1.72" in median_row  # the median of each ratio
    assert "pipeline-run2.json" in page and "kill_middle" in page
    assert "no `pipeline-old.json`" in page  # a missing companion: a note
    assert (out.parent / "plots" / "faults-emulated.png").exists()


def test_the_memory_sweep_is_its_own_section_with_winners_and_auto(tmp_path: Path) -> None:
    data = mdi_vs_ddi()
    for c in data["cells"]:
        c["memory"] = 0.5
    data["cells"] = [c for c in data["cells"] if c["mode"] in ("armdi", "edgepipe")]
    data["winners"] = [{"model_id": "tiny", "size": 224, "link_mbps": 20.0, "workers": 4,
                        "memory": 0.5, "measured": "hybrid", "predicted": "hybrid"}]
    data["auto"] = {"cells": [{"model_id": "tiny", "link_mbps": 20.0, "workers": 4,
                               "memory": 0.5, "chose": "hybrid", "ratio_to_best": 1.8,
                               "ratio_to_hybrid": 0.99}]}
    results = write(tmp_path / "results", mdi_vs_ddi_memory=data)
    template = tmp_path / "t.md"
    template.write_text("{{mdi_vs_ddi_memory}}\n\n{{memory_winners}}\n")
    out = tmp_path / "page.md"
    generate(ReportOptions(results=results, template=template, out=out))
    page = out.read_text()
    assert "tiny (memory 0.5)" in page  # the budget is named with the model
    row = next(line for line in page.splitlines() if "| hybrid | hybrid | hybrid |" in line)
    assert "1.8" in row and "0.99" in row
    assert (tmp_path / "plots" / "mdi-vs-ddi-memory.png").exists()


def test_a_sweeps_command_is_rebuilt_from_its_options() -> None:
    options = {"models": ["mobilenet_v2"], "sizes": ["720x1280"], "links_mbps": [20.0, 1000.0],
               "workers": [3], "modes": ["ddi", "hybrid"], "wire_dtypes": ["float32"],
               "memory": [1.0, 0.34], "images": 12}
    assert command_of("mdi_vs_ddi_720p", {"options": options}) == (
        "armdi bench mdi-vs-ddi --models mobilenet_v2 --sizes 720x1280 --links 20,1000 "
        "--workers 3 --modes ddi,hybrid --wire-dtypes float32 --memory 1,0.34 --images 12 "
        "--json docs/results/mdi-vs-ddi-720p.json")
