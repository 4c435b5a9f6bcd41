"""Mode hybrid with real processes: DDI over chains. The workers form chains of
``chain_workers``, each request runs whole through one chain, and a dead worker costs no
request (only its chain's requests are replayed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.api import PipelineError
from tests.conftest import BuiltModel
from tests.system.conftest import cluster, submit_all
from tests.system.test_resilience import _check, _events, _inputs, _wait


def _half(built: BuiltModel) -> int:
    """A memory cap that makes every worker hold at most about half the model."""
    return (built.manifest.blocks + 1) // 2


def test_hybrid_runs_each_request_through_one_chain_and_matches_the_model(
        built_tiny: BuiltModel, tmp_path: Path) -> None:
    blocks, cap = built_tiny.manifest.blocks, _half(built_tiny)
    inputs = _inputs(30, seed=11)
    with cluster(built_tiny.repo, "tiny", tmp_path, nodes=4, mode="hybrid", chain_workers=2,
                 max_blocks=(cap,) * 4, source_runs_blocks=False) as source:
        results = _check(built_tiny, inputs, submit_all(source, inputs))
        status = source.status()
        with pytest.raises(PipelineError, match="mode hybrid has no boundaries"):
            source.set_boundaries([0, 0, 1, blocks, blocks, blocks])
    chains = {("w1", "w2"), ("w3", "w4")}
    for r in results:  # whole through one chain, in order, no worker over its cap
        nodes = tuple(h.node for h in r.path)
        assert nodes in chains, nodes
        assert r.path[0].start == 0 and r.path[-1].end == blocks
        assert all(a.end == b.start for a, b in zip(r.path, r.path[1:], strict=False))
        assert all(h.end - h.start <= cap for h in r.path)
    assert {tuple(h.node for h in r.path) for r in results} == chains  # both served
    assert status.mode == "hybrid" and status.failed == 0 and status.in_flight == 0
    ranges = {n.name: (n.start, n.end) for n in status.nodes}
    assert ranges["source"] == (0, 0)
    for a, b in chains:
        assert ranges[a][0] == 0 and ranges[a][1] == ranges[b][0] and ranges[b][1] == blocks


def test_hybrid_kill_9_under_load_loses_nothing_and_the_chains_reform(
        built_tiny: BuiltModel, tmp_path: Path) -> None:
    blocks, cap = built_tiny.manifest.blocks, _half(built_tiny)
    with cluster(built_tiny.repo, "tiny", tmp_path, nodes=4, mode="hybrid", chain_workers=2,
                 max_blocks=(cap,) * 4, slowdown=(20.0,) * 4, source_runs_blocks=False,
                 request_timeout_s=20.0) as source:
        first = _inputs(30, seed=3)
        futures = submit_all(source, first)
        _wait(lambda: source.status().completed >= 5, 30, "no results before the fault")
        source.fault("w2", "kill")  # with requests in flight on both chains
        _wait(lambda: _events(source, "rerouted"), 30, "the death was never noticed")
        second = _inputs(20, seed=4)
        futures += submit_all(source, second)
        results = _check(built_tiny, np.concatenate([first, second]), futures)
        status = source.status()
        dead = _events(source, "node_dead")
        rerouted = _events(source, "rerouted")
    assert status.failed == 0 and status.in_flight == 0
    assert [e["node"] for e in dead] == ["w2"] and rerouted
    # three live workers, chains of two: (w1, w3) and w4 alone, which cannot hold the model
    assert rerouted[-1]["route"] == ["w1", "w3"]
    assert {tuple(h.node for h in r.path) for r in results[-20:]} == {("w1", "w3")}
    idle = {n.name: n for n in status.nodes}["w4"]
    assert idle.state == "idle"
    assert idle.reason == f"its chain (w4) holds at most {cap} of the {blocks} blocks (max_blocks)"
