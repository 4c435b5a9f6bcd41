"""``armdi bench rest``'s machinery, run for a moment against ``FakePipeline``: the client
process, the per-request matching of HTTP and pipeline latency, the report. No figure is
asserted: benchmarks report, tests check behaviour."""

from __future__ import annotations

import json
import math
from pathlib import Path

from typer.testing import CliRunner

from appliance.cli import app
from tests.conftest import BuiltModel
from tests.web import FakePipeline
from web.bench import RestBenchOptions, format_report, run_rest_bench


def test_rest_bench_runs_and_reports() -> None:
    steps: list[str] = []
    result = run_rest_bench(FakePipeline(), RestBenchOptions(
        requests=8, clients=(1, 2), duration_s=0.3, repeats=1, warmup=2), progress=steps.append)
    assert result["overhead"]["v2"]["n"] == 8 and result["overhead"]["jpeg"]["n"] == 8
    # the fake says every request took 4 ms in the pipeline; HTTP can only add to that
    assert result["end_to_end"]["v2"]["p50_ms"] > 0
    assert math.isclose(result["overhead"]["v2"]["p50_ms"],
                        result["end_to_end"]["v2"]["p50_ms"] - 4.0, abs_tol=0.01)
    assert set(result["throughput"]) == {"1", "2"}
    for row in result["throughput"].values():
        assert row["own_per_s"] > 0 and row["v2_per_s"] > 0 and row["jpeg_per_s"] > 0
    assert result["decode"]["n"] == 8
    report = format_report(result)
    assert "REST overhead" in report and "v2_ratio_4_clients" in report
    assert any("throughput" in step for step in steps)


def test_armdi_bench_rest_on_a_real_cluster(built_tiny: BuiltModel, tmp_path: Path) -> None:
    out = tmp_path / "rest.json"
    result = CliRunner().invoke(app, [
        "--log-level", "WARNING", "bench", "rest", "--repo", str(built_tiny.repo),
        "--model", "tiny", "--nodes", "1", "--requests", "5", "--clients", "1,2",
        "--duration", "0.3", "--repeats", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "REST overhead" in result.output
    written = json.loads(out.read_text())
    assert written["cluster"]["nodes"] == 1 and set(written["throughput"]) == {"1", "2"}
    assert written["overhead"]["v2"]["n"] == 5
