"""Failures under load: every accepted request ends with exactly one result or one error."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from appliance.api import InferenceResult, PipelineError, RequestTimeoutError
from appliance.data.node import Node, NodeSettings
from appliance.data.source import Source, SourceSettings, WorkerRef
from engines.errors import EngineError
from tests.conftest import BuiltModel
from tests.system.conftest import cluster, submit_all


def _inputs(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 8, 8)).astype(np.float32)


def _outcomes(futures: list[Future[InferenceResult]], timeout: float) -> tuple[int, int]:
    ok = failed = 0
    for f in futures:
        try:
            f.result(timeout=timeout)
            ok += 1
        except RequestTimeoutError:
            failed += 1
    return ok, failed


def test_kill_9_a_worker_under_load_then_restart_it(built_tiny: BuiltModel,
                                                    tmp_path: Path) -> None:
    with cluster(built_tiny.repo, "tiny", tmp_path, nodes=2, slowdown=(30.0, 30.0),
                 min_workers=2, request_timeout_s=3.0, source_runs_blocks=False) as source:
        lc_dir = tmp_path / "run"
        w1 = next(p for p in Path("/proc").iterdir() if p.name.isdigit() and
                  b"--name\0w1" in _cmdline(p) and str(lc_dir).encode() in _cmdline(p))
        futures = submit_all(source, _inputs(40))
        time.sleep(0.05)
        os.kill(int(w1.name), signal.SIGKILL)
        futures += submit_all(source, _inputs(20, seed=1))
        t0 = time.monotonic()
        ok, failed = _outcomes(futures, timeout=10)
        waited = time.monotonic() - t0
        status = source.status()
        # every request accounted for: one outcome each, nothing pending, nothing twice
        assert ok + failed == 60 and failed > 0
        assert status.in_flight == 0 and status.completed == ok and status.failed == failed
        assert status.counters.get("duplicate_results", 0) == 0
        assert waited < 3.0 + 2.0  # no request outlived its deadline by much
        # the worker comes back (same name, same sockets): the source gives it its blocks again
        proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "--log-level", "WARNING",
                                 "node", "--config", str(lc_dir / "cluster.toml"), "--name",
                                 "w1"], stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while not any(e.name == "w1" and e.state == "up" and e.end > e.start
                          for e in source.status().nodes):
                assert time.monotonic() < deadline, source.status().nodes
                time.sleep(0.2)
            after = [f.result(timeout=10) for f in submit_all(source, _inputs(5, seed=2))]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
    assert len(after) == 5 and all(r.path[-1].end == built_tiny.manifest.blocks for r in after)


def _cmdline(proc_dir: Path) -> bytes:
    try:
        return (proc_dir / "cmdline").read_bytes()
    except OSError:
        return b""


def test_cancelled_requests_free_their_slot_and_loops_survive(built_tiny: BuiltModel,
                                                              tmp_path: Path) -> None:
    with cluster(built_tiny.repo, "tiny", tmp_path, nodes=1, slowdown=(50.0,)) as source:
        futures = submit_all(source, _inputs(6))
        for f in futures[::2]:
            f.cancel()
        kept = [f.result(timeout=10) for f in futures[1::2]]
        later = [f.result(timeout=10) for f in submit_all(source, _inputs(4, seed=3))]
        status = source.status()
    assert len(kept) == 3 and len(later) == 4
    assert status.in_flight == 0 and status.counters.get("internal_errors", 0) == 0


@contextlib.contextmanager
def one_worker(built: BuiltModel, tmp: Path, worker_key: bytes | None = None,
               source_key: bytes | None = None,
               **source: object) -> Iterator[tuple[Node, threading.Event, Source]]:
    """An in-process worker thread ``w`` and a source ``s`` (not started) that uses it."""
    node = Node(NodeSettings(name="w", data_addr=f"ipc://{tmp}/w.data",
                             control_addr=f"ipc://{tmp}/w.ctl", repo=built.repo,
                             model_id="tiny", key=worker_key))
    stop = threading.Event()
    thread = threading.Thread(target=node.run, args=(stop,), daemon=True)
    thread.start()
    settings = SourceSettings(name="s", data_addr=f"ipc://{tmp}/s.data", repo=built.repo,
                              model_id="tiny", key=source_key,
                              workers=(WorkerRef("w", f"ipc://{tmp}/w.data",
                                                 f"ipc://{tmp}/w.ctl"),),
                              **source)  # type: ignore[arg-type]
    src = Source(settings)
    try:
        yield node, stop, src
    finally:
        src.close()
        stop.set()
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_a_request_keeps_its_own_timeout(built_tiny: BuiltModel, tmp_path: Path) -> None:
    with one_worker(built_tiny, tmp_path, run_blocks=False,
                    request_timeout_s=30.0) as (_node, stop, source):
        source.start()
        stop.set()  # the only worker goes away: nothing will answer
        time.sleep(1.0)
        t0 = time.monotonic()
        with pytest.raises(RequestTimeoutError):
            source.submit(_inputs(1)[:1], timeout_s=0.6).result(timeout=10)
        elapsed = time.monotonic() - t0
    assert 0.5 <= elapsed < 2.0, elapsed


def test_an_engine_error_on_a_worker_fails_the_request_at_once(built_tiny: BuiltModel,
                                                               tmp_path: Path) -> None:
    class Broken:
        def infer(self, x: np.ndarray) -> np.ndarray:
            raise EngineError("the GPU fell off the bus")

    with one_worker(built_tiny, tmp_path, run_blocks=False,
                    request_timeout_s=30.0) as (node, _stop, source):
        source.start()
        node.engines.get = lambda start, end: Broken()  # type: ignore[assignment,method-assign,return-value]
        t0 = time.monotonic()
        with pytest.raises(PipelineError, match="fell off the bus"):
            source.submit(_inputs(1)[:1]).result(timeout=10)
        elapsed = time.monotonic() - t0
        status = source.status()
    assert elapsed < 2.0 and status.retried == 0 and status.failed == 1


def test_a_worker_with_another_cluster_key_is_refused_with_the_reason(
        built_tiny: BuiltModel, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with one_worker(built_tiny, tmp_path, worker_key=b"a" * 32, source_key=b"b" * 32,
                    connect_timeout_s=10.0) as (_node, _stop, source):
        t0 = time.monotonic()
        source.start()
        elapsed = time.monotonic() - t0
        states = {n.name: n.state for n in source.status().nodes}
    assert states["w"] == "refused" and elapsed < 5.0
    assert any("cluster key" in r.message for r in caplog.records)
