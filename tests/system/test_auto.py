"""Mode auto with real processes: the source picks the mode predicted fastest at start, says
why in /v1/pipeline, and serves every request with the full model's answer in that mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from tests.conftest import BuiltModel
from tests.system.conftest import cluster, submit_all
from tests.system.test_resilience import _check, _events, _inputs, _wait
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


def test_auto_switches_modes_at_run_time_without_losing_a_request(
        built_tiny: BuiltModel, tmp_path: Path) -> None:
    """Local at start (the workers 1000x slower); then the workers become fast and the source
    100x slow: the source decides again, switches to a mode that uses the workers, and the
    requests in flight across the switch each end with the full model's one answer. (Not
    slower: in ddi the source, which runs blocks, still takes a share of the requests.)"""
    first, second = _inputs(10, seed=13), _inputs(30, seed=14)
    with cluster(built_tiny.repo, "tiny", tmp_path, nodes=2, mode="auto",
                 source_runs_blocks=True, slowdown=(1000.0, 1000.0)) as source:
        futures = submit_all(source, first)
        [f.result(timeout=30) for f in futures]
        assert source.status().mode == "local"
        for node, factor in (("w1", 1.0), ("w2", 1.0), (source.settings.name, 100.0)):
            source.set_slowdown(node, factor)
        futures += submit_all(source, second)  # in flight while it switches
        # the counter, not the mode: the mode changes as the switch starts, the counter
        # once the workers are configured for it
        _wait(lambda: source.status().counters.get("mode_switches"), 20,
              "mode auto never switched")
        _check(built_tiny, np.concatenate([first, second]), futures)
        status = source.status()
        switched = [e for e in _events(source, "auto") if e.get("previous") == "local"]
    assert status.mode in ("ddi", "armdi") and status.failed == 0
    assert status.counters.get("mode_switches") == 1 and switched
    assert switched[0]["mode"] == status.mode
