"""Mode auto with real processes: the source picks the mode predicted fastest at start, says
why in /v1/pipeline, and serves every request with the full model's answer in that mode."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from tests.conftest import BuiltModel
from tests.system.conftest import cluster, submit_all
from tests.system.test_resilience import _check, _events, _inputs
from web.app import create_app


def test_auto_runs_the_mode_it_predicts_fastest(built_tiny: BuiltModel, tmp_path: Path) -> None:
    """The source runs no blocks, so local is out; which of ddi and armdi wins depends on
    this machine's profile, so the test checks that the mode run is the prediction's best."""
    inputs = _inputs(20, seed=11)
    with cluster(built_tiny.repo, "tiny", tmp_path, nodes=2, mode="auto",
                 source_runs_blocks=False) as source, TestClient(create_app(source)) as client:
        _check(built_tiny, inputs, submit_all(source, inputs))
        view = client.get("/v1/pipeline").json()
        status = source.status()
        chosen = _events(source, "auto")
    auto = view["auto"]
    feasible = [a for a in auto["alternatives"] if a["feasible"]]
    assert {a["mode"] for a in feasible} == {"ddi", "armdi"}
    best = max(feasible, key=lambda a: a["throughput_ips"])
    assert view["mode"] == auto["mode"] == status.mode == best["mode"]
    assert next(a for a in auto["alternatives"] if a["mode"] == "local")["why"] == (
        "the source runs no blocks")
    assert chosen and chosen[0]["mode"] == status.mode and status.failed == 0
    serving = [n for n in status.nodes if n.role == "worker" and n.end > n.start]
    assert serving  # the workers run blocks (the whole model each in ddi, ranges in armdi)


def test_auto_keeps_the_work_on_the_source_when_the_workers_are_far_slower(
        built_tiny: BuiltModel, tmp_path: Path) -> None:
    inputs = _inputs(10, seed=12)
    with cluster(built_tiny.repo, "tiny", tmp_path, nodes=2, mode="auto",
                 source_runs_blocks=True, slowdown=(50.0, 50.0)) as source:
        results = _check(built_tiny, inputs, submit_all(source, inputs))
        status = source.status()
    assert status.mode == "local" and status.auto is not None
    assert "local is predicted fastest" in status.auto["reason"]
    assert all([h.node for h in r.path] == ["source"] for r in results)
