"""Mode armdi under faults, with real processes: a dead or paused worker costs no request.

Every request must end with exactly one result equal to the full model's, whatever dies;
a paused worker is declared dead, rejoins when it resumes, and its stale outputs are dropped
as duplicates; a slow worker is reported slow, never dead.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from appliance.api import InferenceResult
from appliance.data.source import Source
from tests.conftest import BuiltModel, run_onnx
from tests.system.conftest import cluster, submit_all


def _inputs(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 8, 8)).astype(np.float32)


def _events(source: Source, kind: str) -> list[dict[str, object]]:
    return [e for e in list(source._events) if e["type"] == kind]


def _wait(condition, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _detectors(source: Source) -> str:
    """What the source's failure detectors and route say now (for a failure message)."""
    now = time.monotonic()
    return "; ".join(f"{w.ref.name} {w.state} silent {w.detector.silence_ms(now):.0f} ms "
                     f"phi {w.detector.phi(now):.1f}" for w in source.workers) + (
        f"; route {[r[0] for r in source._route]}")


def _check(built: BuiltModel, inputs: np.ndarray,
           futures: list[Future[InferenceResult]]) -> list[InferenceResult]:
    results = [f.result(timeout=60) for f in futures]
    expected = run_onnx(built.model_dir / "model.onnx", inputs)[0]
    got = np.concatenate([r.output for r in results])
    assert np.max(np.abs(got - expected)) <= 1e-4  # every one right: none lost, none wrong
    assert len({r.request_id for r in results}) == len(results)
    return results


@pytest.mark.parametrize("victim", ["w2", "w3"])  # a middle worker, the last worker
def test_kill_9_under_load_loses_nothing(built_tiny: BuiltModel, tmp_path: Path,
                                         victim: str) -> None:
    with cluster(built_tiny.repo, "tiny", tmp_path, nodes=3, mode="armdi", min_workers=3,
                 slowdown=(20.0, 20.0, 20.0), source_runs_blocks=False,
                 request_timeout_s=20.0) as source:
        first = _inputs(40, seed=1)
        futures = submit_all(source, first)
        _wait(lambda: source.status().completed >= 5, 30, "no results before the fault")
        source.fault(victim, "kill")
        second = _inputs(40, seed=2)
        futures += submit_all(source, second)
        _check(built_tiny, np.concatenate([first, second]), futures)
        status = source.status()
        dead = _events(source, "node_dead")
        rerouted = _events(source, "rerouted")
    assert status.failed == 0 and status.in_flight == 0
    assert [e["node"] for e in dead] == [victim] and rerouted
    assert victim not in rerouted[-1]["route"]  # type: ignore[operator]
    states = {n.name: n.state for n in status.nodes}
    assert states[victim] == "dead" and all(states[w] != "dead" for w in states if w != victim)


def test_a_paused_worker_is_declared_dead_then_rejoins(built_tiny: BuiltModel,
                                                       tmp_path: Path) -> None:
    with cluster(built_tiny.repo, "tiny", tmp_path, nodes=2, mode="armdi", min_workers=2,
                 slowdown=(20.0, 20.0), source_runs_blocks=False,
                 request_timeout_s=20.0) as source:
        first = _inputs(30, seed=3)
        futures = submit_all(source, first)
        _wait(lambda: source.status().completed >= 5, 30, "no results before the pause")
        # SIGSTOP, SIGCONT 4 s later (on a busy 2-core machine detection can take a while)
        source.fault("w2", "pause", seconds=4.0)
        try:
            _wait(lambda: _events(source, "node_dead"), 10, "the paused worker was not "
                  "declared dead")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {_detectors(source)}") from None
        second = _inputs(30, seed=4)
        futures += submit_all(source, second)
        _wait(lambda: _events(source, "rejoined"), 20, "the resumed worker did not rejoin")
        third = _inputs(20, seed=5)
        futures += submit_all(source, third)
        _check(built_tiny, np.concatenate([first, second, third]), futures)
        _wait(lambda: any(n.name == "w2" and n.state in ("up", "slow") and n.end > n.start
                          for n in source.status().nodes), 20, "w2 has no blocks again")
        status = source.status()
    assert status.failed == 0
    assert status.counters.get("rejoins", 0) == 1


def test_a_slow_worker_is_slow_not_dead(built_tiny: BuiltModel, tmp_path: Path) -> None:
    with cluster(built_tiny.repo, "tiny", tmp_path, nodes=2, mode="armdi", min_workers=2,
                 slowdown=(2.0, 2.0), source_runs_blocks=False) as source:
        source.set_slowdown("w2", 16.0)  # 8x slower than w1
        inputs = _inputs(150, seed=6)
        futures = submit_all(source, inputs)
        _wait(lambda: any(n.name == "w2" and n.state == "slow" for n in source.status().nodes),
              30, "w2 was never reported slow")
        _check(built_tiny, inputs, futures)
        status = source.status()
    assert not _events(source, "node_dead") and status.counters.get("deaths", 0) == 0
    assert status.failed == 0


def test_armdi_up_restarts_a_killed_worker_and_it_rejoins(built_tiny: BuiltModel,
                                                          tmp_path: Path) -> None:
    """Whether the source first declares it dead or first sees the restarted process, the
    worker comes back as a new process with blocks, and nothing is lost."""
    with cluster(built_tiny.repo, "tiny", tmp_path, nodes=2, mode="armdi", min_workers=2,
                 source_runs_blocks=False, supervise=True) as source:
        futures = submit_all(source, _inputs(10, seed=7))
        [f.result(timeout=30) for f in futures]
        w1 = next(w for w in source.workers if w.ref.name == "w1")
        _wait(lambda: w1.last is not None, 10, "w1 never polled")
        assert w1.last is not None
        old_pid = w1.last.pid
        source.fault("w1", "kill")

        def back() -> bool:
            last = w1.last
            return (last is not None and last.pid not in (0, old_pid) and last.end > last.start
                    and w1.state in ("up", "slow"))

        _wait(back, 40, "the restarted worker is not back in the chain")
        inputs = _inputs(20, seed=8)
        _check(built_tiny, inputs, submit_all(source, inputs))
        status = source.status()
    assert status.failed == 0
