"""``armdi bench pipeline`` on the tiny model: a smoke test of the JSON it writes.

Only the shape of the result is checked (keys present, figures positive); benchmarks report
timings, tests never assert them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from appliance.bench import GOALS, PipelineBenchOptions, format_report, run_pipeline_bench
from appliance.cli import app
from appliance.wire import frames as fr
from appliance.wire.transport import DataInbox, DataOutbox
from engines.errors import ModelNotFoundError
from tests.conftest import BuiltModel

FAST: dict[str, Any] = {"requests": 4, "repeats": 1, "warmup": 2, "window": 3,
                        "transfer_messages": 10}


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_pipeline_writes_the_summary(built_tiny: BuiltModel) -> None:
    model = built_tiny.manifest.model_id
    result = run_pipeline_bench(PipelineBenchOptions(repo=built_tiny.repo, model=model, **FAST))
    # the JSON round trip is what ``--json`` writes
    data = json.loads(json.dumps(result))
    assert data["model"] == model
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["cpu_model"]
    assert set(data["load_avg"]) == {"start", "end"}
    for key in ("direct", "pipeline_1node", "pipeline_1node_pinned", "pipeline_2node",
                "pipeline_2node_balanced"):
        for figure in ("throughput_ips", "p50_ms", "p99_ms"):
            assert _positive(data[key][figure]), (key, figure, data[key])
    boundaries = data["pipeline_2node"]["boundaries"]
    assert boundaries[0] == boundaries[1] == 0  # the source runs no blocks
    assert boundaries[-1] == built_tiny.manifest.blocks
    assert data["pipeline_1node"]["boundaries"] == [0, 0, built_tiny.manifest.blocks]
    blocks = built_tiny.manifest.blocks
    balance = data["balance"]
    assert 0 < balance["balanced"] < blocks and 0 < balance["static"] < blocks
    assert str(balance["balanced"]) in balance["throughput_ips"]
    assert all(0 < p["boundary"] < blocks for p in balance["bisection"])
    assert data["pipeline_2node_balanced"]["boundaries"] == [0, 0, balance["balanced"], blocks]
    assert _positive(data["direct"]["cpu_ms_per_request"])
    assert data["transfer_input"]["bytes"] == built_tiny.manifest.input.bytes_per_sample
    assert _positive(data["transfer_input"]["raw_ms"])
    assert _positive(data["transfer_input"]["frame_ms"])
    transfer = data["transfer"]
    assert transfer["bytes"] > 0 and _positive(transfer["raw_ms"])
    assert _positive(transfer["frame_ms"])
    summary = data["summary"]
    assert set(GOALS) == {"overhead_1node", "hop_cost_ratio", "speedup_2node", "cpu_ratio"}
    assert _positive(summary["speedup_2node_static"])
    assert summary["speedup_2node"] >= summary["speedup_2node_static"]
    assert math.isfinite(summary["overhead_1node_ms"])
    for ratio in GOALS:
        assert _positive(summary[ratio]), ratio
        assert isinstance(summary["met"][ratio], bool)
        assert summary["goals"][ratio]
    text = format_report(result)
    assert "speedup_2node" in text and "direct ORT" in text


def test_bench_names_the_build_command_when_the_model_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="armdi build nothing"):
        run_pipeline_bench(PipelineBenchOptions(repo=tmp_path, model="nothing", **FAST))
    result = CliRunner().invoke(app, ["bench", "pipeline", "--model", "nothing",
                                      "--repo", str(tmp_path)])
    assert result.exit_code != 0
    assert isinstance(result.exception, ModelNotFoundError)


# The hop path the benchmark measures: frames copied straight into NNG's message.
@pytest.mark.parametrize("key", [None, b"k" * 32])
def test_send_frame_delivers_the_bytes_of_encode_frame(key: bytes | None) -> None:
    tensors: list[np.ndarray] = [np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4),
               np.arange(24, dtype=np.float16).reshape(1, 4, 6)[:, ::2],  # strided
               np.arange(6, dtype=">f4").reshape(1, 6)]  # big-endian: converted on the way
    with DataInbox("inproc://bench-hop", max_bytes=1 << 20) as inbox, \
            DataOutbox("inproc://bench-hop") as outbox:
        for i, tensor in enumerate(tensors):
            frame = fr.Frame(kind=fr.FrameKind.ACTIVATION, request_id=i, attempt=1,
                             fingerprint=bytes(32), start_block=1, tensor=tensor,
                             trace=(fr.TraceEntry("w1", 0, 1, 1.5),))
            outbox.send_frame(fr.frame_parts(frame, key), timeout_ms=2000)
            buf = inbox.recv(timeout_ms=2000)
            assert bytes(buf) == bytes(fr.encode_frame(frame, key))
            got = fr.decode_frame(buf, key=key, max_bytes=1 << 20)
            assert bytes(fr.encode_frame(got, key)) == bytes(fr.encode_frame(frame, key))
            assert got.request_id == i and got.trace == frame.trace
            np.testing.assert_array_equal(got.tensor, tensor)


def test_bench_adaptive_runs_and_summarises(built_tiny: BuiltModel) -> None:
    from appliance.bench_adaptive import AdaptiveBenchOptions, format_report, run_adaptive_bench

    options = AdaptiveBenchOptions(repo=built_tiny.repo, model="tiny", duration_s=4.0,
                                   change_s=1.0, back_s=3.0, modes=("armdi", "equal"),
                                   scenarios=("a",), time_scale=20.0)
    result = json.loads(json.dumps(run_adaptive_bench(options)))
    assert set(result["runs"]) == {"a/armdi", "a/equal"}
    for run in result["runs"].values():
        assert len(run["throughput_per_s"]) == 4 and sum(run["throughput_per_s"]) > 0
        assert run["failed_requests"] == 0 and all(o > 0 for o in run["optimum_ips"])
    summary = result["summary"]
    assert _positive(summary["steady_ratio_to_optimum"])
    assert summary["failed_requests"] == {"a/armdi": 0, "a/equal": 0}
    assert "emulated compute" in result["emulation"]
    assert "a/armdi" in format_report(result)


def test_bench_adaptive_homogeneous_scenario_reports_the_spread(built_tiny: BuiltModel) -> None:
    from appliance.bench_adaptive import AdaptiveBenchOptions, run_adaptive_bench

    options = AdaptiveBenchOptions(repo=built_tiny.repo, model="tiny", duration_s=4.0,
                                   modes=("armdi", "equal"), scenarios=("h",))
    result = json.loads(json.dumps(run_adaptive_bench(options)))
    assert set(result["runs"]) == {"h/armdi"}  # equal stage times is the yardstick, not a run
    run = result["runs"]["h/armdi"]
    assert run["emulated"] is False and set(run["stage_ms"]) == {"w1", "w2"}
    assert run["failed_requests"] == 0
    summary = result["summary"]
    assert summary["homogeneous_spread_real"] >= 0
    assert len(summary["homogeneous_compute_ms_real"]) == 2
    assert result["fused_times_ms"] is None  # only he measures them


def test_bench_adaptive_emulates_he_with_the_measured_fused_times(built_tiny: BuiltModel
                                                                   ) -> None:
    """Scenario he: every fused segment of a 2-worker split is timed first; the workers wait
    those times (test_emulated_times) and the optimum beside the run is the table's best
    split, not the profile's."""
    from appliance.bench_adaptive import AdaptiveBenchOptions, best_split, run_adaptive_bench

    scale = 50.0
    options = AdaptiveBenchOptions(repo=built_tiny.repo, model="tiny", duration_s=4.0,
                                   modes=("armdi",), scenarios=("he",), fused_rounds=3,
                                   time_scale=scale)
    result = json.loads(json.dumps(run_adaptive_bench(options)))
    blocks = built_tiny.manifest.blocks
    table = {tuple(map(int, k.split(":"))): v for k, v in result["fused_times_ms"].items()}
    assert set(table) == {r for k in range(1, blocks) for r in ((0, k), (k, blocks))}
    assert all(v > 0 for v in table.values())
    run = result["runs"]["he/armdi"]
    assert run["emulated"] is True and run["failed_requests"] == 0
    assert sum(run["throughput_per_s"]) > 0
    # the optimum beside the run is the table's best split (x time_scale), not the profile's
    k, bottleneck, spread = best_split(table, blocks)  # type: ignore[arg-type]
    assert run["optimum_ips"][-1] == pytest.approx(1000.0 / (bottleneck * scale))
    summary = result["summary"]
    assert summary["homogeneous_best_boundary"] == k
    assert summary["homogeneous_best_spread"] == pytest.approx(spread, abs=5.01e-4)  # 3 places
    assert summary["homogeneous_spread"] >= 0 and "moves_per_30s_rest" in summary
    assert "measured times" in result["emulation"]


def test_fused_times_of_a_large_model_are_timed_in_groups(built_tiny: BuiltModel,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """At most FUSED_OPEN_BYTES of weights open at once: with a budget below one copy of the
    weights, one boundary at a time, and every segment of every split still timed."""
    from appliance import bench_adaptive
    from engines.repository import ModelRepository

    monkeypatch.setattr(bench_adaptive, "FUSED_OPEN_BYTES", 1)
    said: list[str] = []
    manifest = built_tiny.manifest
    times = bench_adaptive.measure_fused_times(ModelRepository(built_tiny.repo), manifest, 2,
                                               said.append)
    blocks = manifest.blocks
    assert set(times) == {r for k in range(1, blocks) for r in ((0, k), (k, blocks))}
    assert all(ms > 0 for ms in times.values())
    assert len(said) == blocks - 1  # one group per boundary


def test_bench_adaptive_he_needs_every_fused_segment_of_a_split(built_tiny: BuiltModel) -> None:
    from appliance.bench_adaptive import AdaptiveBenchOptions, run_adaptive_bench
    from engines.errors import ArmdiError
    from engines.manifest import Manifest

    path = built_tiny.repo / "tiny" / "manifest.json"
    manifest = Manifest.model_validate_json(path.read_text())
    blocks = manifest.blocks
    kept = {backend: tuple(s for s in segs if (s.start, s.end) != (0, blocks - 1))
            for backend, segs in manifest.segments.items()}
    path.write_text(manifest.model_copy(update={"segments": kept}).model_dump_json())
    options = AdaptiveBenchOptions(repo=built_tiny.repo, model="tiny", duration_s=4.0,
                                   modes=("armdi",), scenarios=("he",))
    with pytest.raises(ArmdiError, match=rf"not built \(e.g. \[0, {blocks - 1}\)\); rebuild "
                                         "it with --segments all"):
        run_adaptive_bench(options)


@pytest.mark.parametrize("emulate", [False, True])
def test_bench_faults_counts_every_request(built_tiny: BuiltModel, emulate: bool) -> None:
    from appliance.bench_faults import FaultBenchOptions, format_report, run_fault_bench

    options = FaultBenchOptions(repo=built_tiny.repo, model="tiny", duration_s=5.0,
                                fault_s=2.0, modes=("armdi",), faults=("kill_middle",),
                                emulate=emulate, time_scale=20.0)
    result = json.loads(json.dumps(run_fault_bench(options)))
    (run,) = result["runs"]
    assert run["sent"] == run["returned"] + run["lost"] and run["returned"] > 0
    assert (run["lost"], run["duplicated"]) == (0, 0)
    assert run["wrong"] == (None if emulate else 0)  # emulated answers are zeros: unchecked
    assert run["time_to_next_completion_s"] is not None and run["reroutes"] >= 1
    assert result["summary"]["lost"] == 0
    assert "armdi/kill_middle" in format_report(result)


def test_bench_security_only_measures_tls_and_hmac_side_by_side(built_tiny: BuiltModel) -> None:
    model = built_tiny.manifest.model_id
    options = PipelineBenchOptions(repo=built_tiny.repo, model=model, requests=3, repeats=1,
                                   warmup=1, window=2, security_only=True)
    data = json.loads(json.dumps(run_pipeline_bench(options)))
    section = data["security"]
    expected = {"security_plain": ("tcp", False), "security_hmac": ("tcp", True),
                "security_tls": ("tls", False), "security_tls_hmac": ("tls", True)}
    for key, (transport, hmac) in expected.items():
        assert (section[key]["transport"], section[key]["hmac"]) == (transport, hmac)
        assert _positive(section[key]["throughput_ips"]) and _positive(section[key]["p50_ms"])
    assert all(_positive(v) for v in section["ratios"].values())
    text = format_report(data)
    assert "tls+tcp://, HMAC" in text and "tls_throughput_ratio" in text


def test_the_settled_split_is_read_as_medians_over_the_second_half_on_the_final_boundaries(
) -> None:
    from appliance.bench_adaptive import _settled_compute

    snaps = [{"t": 1.0, "boundaries": [0, 0, 24, 49], "compute_ms": {"w1": 9.0, "w2": 1.0}},
             {"t": 6.0, "boundaries": [0, 0, 24, 49], "compute_ms": {"w1": 9.0, "w2": 1.0}},
             {"t": 7.0, "boundaries": [0, 0, 27, 49], "compute_ms": {"w1": 5.0, "w2": 6.0}},
             {"t": 8.0, "boundaries": [0, 0, 27, 49], "compute_ms": {"w1": 7.0, "w2": 5.5}},
             {"t": 9.0, "boundaries": [0, 0, 27, 49], "compute_ms": {"w1": 5.2, "w2": 5.4}}]
    assert _settled_compute(snaps, since_s=5.0) == {"w1": 5.2, "w2": 5.5}
    assert _settled_compute([], since_s=5.0) == {}
