"""Membership among real worker processes: worker-side fail-over, joins through any member.

- A middle worker killed with SIGKILL under load: its predecessor's stabilisation finds it
  dead and sends past it to the next successor, which runs the missing blocks, before the
  source's detector has declared anything (the source's detector is made slow here, so the
  order is certain on any machine). Every request ends once, equal to the full model's.
- When the last worker dies, its predecessor runs the rest of the model itself.
- A worker started with ``--join`` and a worker's (or the source's) control address is
  admitted through it and given blocks.
- A worker of another model version is refused on joining, with the reason, and exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from appliance.cluster import LocalCluster, LocalClusterOptions
from appliance.control.detector import DetectorSettings
from appliance.data.source import Source
from appliance.settings import source_settings
from appliance.wire import messages as msg
from appliance.wire.transport import ControlClient
from tests.conftest import BuiltModel, other_version
from tests.system.conftest import submit_all
from tests.system.test_resilience import _check, _events, _inputs, _wait

# the source never declares a worker dead: the workers' own membership is what is tested
SLOW_DETECTOR = DetectorSettings(acceptable_pause_ms=60_000, max_silence_ms=600_000)


@contextlib.contextmanager
def _cluster(repo: Path, tmp: Path, nodes: int, start: int, detector: DetectorSettings | None,
             **options: object) -> Iterator[tuple[LocalCluster, Source]]:
    """``nodes`` workers in the config, the first ``start`` of them started and known to
    the source (the rest can join later)."""
    opts = LocalClusterOptions(model="tiny", repo=repo, run_dir=tmp / "run", port=0,
                               nodes=nodes, mode="armdi", source_runs_blocks=False,
                               **options)  # type: ignore[arg-type]
    lc = LocalCluster(opts)
    try:
        lc.start_workers(count=start)
        settings = source_settings(lc.config)
        settings = dataclasses.replace(settings, workers=settings.workers[:start],
                                       detector=detector or settings.detector)
        source = Source(settings)
        try:
            source.start()
            yield lc, source
        finally:
            source.close()
    finally:
        lc.stop()


def _status(lc: LocalCluster, name: str) -> msg.NodeStatus:
    with ControlClient(lc.config.worker(name).control_addr, key=None) as client:
        reply = client.request(msg.StatusRequest(), timeout_ms=2000)
    assert isinstance(reply, msg.NodeStatus)
    return reply


def test_a_killed_middle_worker_is_passed_over_by_its_predecessor(built_tiny: BuiltModel,
                                                                  tmp_path: Path) -> None:
    with _cluster(built_tiny.repo, tmp_path, 3, 3, SLOW_DETECTOR, min_workers=3,
                  slowdown=(20.0, 20.0, 20.0), request_timeout_s=30.0) as (lc, source):
        assert _status(lc, "w1").successors == ("w2", "w3")  # r = 2
        first = _inputs(30, seed=11)
        futures = submit_all(source, first)
        _wait(lambda: source.status().completed >= 5, 30, "no results before the fault")
        source.fault("w2", "kill")
        second = _inputs(30, seed=12)
        futures += submit_all(source, second)
        _wait(lambda: _status(lc, "w1").failovers > 0, 10, "w1 never sent past dead w2")
        assert _status(lc, "w1").successors == ("w3",)  # stabilisation dropped w2
        # what it had sent to w2 goes again, to w3 (the source, which would replay it, has
        # not re-routed: its detector is made slow here)
        _wait(lambda: _status(lc, "w1").resent > 0, 10, "w1 never sent w2's frames again")
        results = _check(built_tiny, np.concatenate([first, second]), futures)
        _wait(lambda: _events(source, "failover"), 5, "no failover event")
        status = source.status()
    assert status.failed == 0 and status.in_flight == 0
    assert not _events(source, "node_dead")  # the workers recovered on their own
    # the path of some results: w1 straight to w3, which ran the blocks w2 would have run
    w1_end = next(r.path for r in results if [h.node for h in r.path] == ["w1", "w2", "w3"])[0].end
    skipped = [r.path for r in results if [h.node for h in r.path] == ["w1", "w3"]]
    assert skipped and all(p[1].start == w1_end == p[0].end for p in skipped)
    assert {e["node"] for e in _events(source, "failover")} == {"w1"}


def test_when_the_last_worker_dies_its_predecessor_runs_the_rest(built_tiny: BuiltModel,
                                                                 tmp_path: Path) -> None:
    with _cluster(built_tiny.repo, tmp_path, 2, 2, SLOW_DETECTOR, min_workers=2,
                  slowdown=(20.0, 20.0), request_timeout_s=30.0) as (lc, source):
        assert _status(lc, "w1").successors == ("w2",)
        first = _inputs(20, seed=14)
        futures = submit_all(source, first)
        _wait(lambda: source.status().completed >= 5, 30, "no results before the fault")
        source.fault("w2", "kill")
        second = _inputs(20, seed=15)
        futures += submit_all(source, second)
        results = _check(built_tiny, np.concatenate([first, second]), futures)
        w1 = _status(lc, "w1")
        status = source.status()
    assert status.failed == 0 and not _events(source, "node_dead")
    assert w1.successors == () and w1.failovers > 0
    blocks = built_tiny.manifest.blocks
    alone = [r.path for r in results if {h.node for h in r.path} == {"w1"}]
    assert alone and all(p[-1].end == blocks for p in alone)  # w1 ran to the last block


@pytest.mark.parametrize("via", ["w1", "source"])
def test_a_worker_joins_through_any_member_and_gets_blocks(built_tiny: BuiltModel,
                                                           tmp_path: Path, via: str) -> None:
    with _cluster(built_tiny.repo, tmp_path, 3, 2, None, min_workers=3) as (lc, source):
        assert [r[0] for r in source._route] == ["w1", "w2"]
        addr = lc.config.node(via).control_addr
        assert addr is not None
        proc = lc.join("w3", via=addr)
        _wait(lambda: any(n.name == "w3" and n.end > n.start and n.state == "up"
                          for n in source.status().nodes), 30, "w3 never got blocks")
        inputs = _inputs(20, seed=13)
        results = _check(built_tiny, inputs, submit_all(source, inputs))
        joined = _events(source, "joined")
        assert proc.poll() is None
    assert [e["node"] for e in joined] == ["w3"]
    assert joined[0]["hops"] == (1 if via == "w1" else 0)  # a worker forwarded it
    assert all([h.node for h in r.path] == ["w1", "w2", "w3"] for r in results)


def test_a_worker_of_another_model_version_is_refused_on_joining(built_tiny: BuiltModel,
                                                                 tmp_path: Path) -> None:
    other = other_version(built_tiny, tmp_path)
    with _cluster(built_tiny.repo, tmp_path, 2, 1, None) as (lc, source):
        config = lc.config_path.read_text().replace(str(built_tiny.repo), str(other))
        other_config = tmp_path / "other.toml"
        other_config.write_text(config)
        lc.config_path, keep = other_config, lc.config_path
        try:
            proc = lc.join("w2", via=lc.config.worker("w1").control_addr,
                           stderr=subprocess.PIPE)
        finally:
            lc.config_path = keep
        _, err = proc.communicate(timeout=30)
        refused = _events(source, "refused")
    assert proc.returncode == 2
    text = err.decode()
    assert "join refused" in text and "fingerprint" in text and "armdi pack tiny" in text
    assert [e["node"] for e in refused] == ["w2"]
    assert source.status().counters.get("joins_refused") == 1
