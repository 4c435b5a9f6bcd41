"""``armdi bench pipeline`` on the tiny model: a smoke test of the JSON it writes.

Only the shape of the result is checked (keys present, figures positive); benchmarks report
timings, tests never assert them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.bench import GOALS, PipelineBenchOptions, format_report, run_pipeline_bench
from appliance.cli import app
from engines.errors import ModelNotFoundError
from tests.conftest import BuiltModel

FAST = {"requests": 4, "repeats": 1, "warmup": 2, "window": 3, "transfer_messages": 10}


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
    for key in ("direct", "pipeline_1node", "pipeline_1node_pinned", "pipeline_2node"):
        for figure in ("throughput_ips", "p50_ms", "p99_ms"):
            assert _positive(data[key][figure]), (key, figure, data[key])
    boundaries = data["pipeline_2node"]["boundaries"]
    assert boundaries[0] == boundaries[1] == 0  # the source runs no blocks
    assert boundaries[-1] == built_tiny.manifest.blocks
    assert data["pipeline_1node"]["boundaries"] == [0, 0, built_tiny.manifest.blocks]
    transfer = data["transfer"]
    assert transfer["bytes"] > 0 and _positive(transfer["raw_ms"])
    assert _positive(transfer["frame_ms"])
    summary = data["summary"]
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
