"""Bad input at a worker and at the source: rejected with a counter, nothing stops."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from appliance.data.node import Node, NodeSettings
from appliance.data.source import Source, SourceSettings, WorkerRef
from appliance.wire import frames as fr
from appliance.wire import messages as msg
from appliance.wire.replay import Stamper
from appliance.wire.transport import ControlClient, DataInbox, DataOutbox
from engines.repository import ModelRepository
from tests.conftest import BuiltModel, other_version

NodeFixture = tuple[Node, BuiltModel, Path]  # a running worker, its model, its directory

KEY = bytes(range(32))
STAMPS = Stamper()  # under a cluster key every frame carries a replay stamp


@pytest.fixture
def node(built_tiny: BuiltModel, tmp_path: Path) -> Iterator[NodeFixture]:
    settings = NodeSettings(name="w1", data_addr=f"ipc://{tmp_path}/w1.data",
                            control_addr=f"ipc://{tmp_path}/w1.ctl", repo=built_tiny.repo,
                            model_id="tiny", key=KEY, max_frame_bytes=1 << 20)
    worker = Node(settings)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    yield worker, built_tiny, tmp_path
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()


def _frame(manifest_fp: bytes, start: int, tensor: np.ndarray, **kw: object) -> fr.Frame:
    args: dict[str, object] = {"kind": fr.FrameKind.ACTIVATION, "request_id": 7, "attempt": 1,
                               "fingerprint": manifest_fp, "start_block": start,
                               "tensor": tensor, "ext": STAMPS.next(), **kw}
    return fr.Frame(**args)  # type: ignore[arg-type]


@contextlib.contextmanager
def _links(tmp: Path) -> Iterator[tuple[ControlClient, DataInbox, DataOutbox]]:
    """w1's control client, an inbox for the results (``result.data``) and w1's data outbox."""
    with ControlClient(f"ipc://{tmp}/w1.ctl", key=KEY) as ctl, \
            DataInbox(f"ipc://{tmp}/result.data", max_bytes=1 << 20) as results, \
            DataOutbox(f"ipc://{tmp}/w1.data") as out:
        yield ctl, results, out


def _configure(ctl: ControlClient, tmp: Path, start: int, end: int,
               session: str | None = None) -> None:
    """w1 runs blocks [start, end) and sends what it makes to ``result.data``."""
    ack = ctl.request(msg.Configure(node="w1", start=start, end=end, successor_addr=None,
                                    result_addr=f"ipc://{tmp}/result.data", session=session),
                      timeout_ms=10_000)
    assert isinstance(ack, msg.Ack) and ack.ok, ack


def test_worker_drops_bad_frames_and_keeps_serving(node: NodeFixture) -> None:
    _worker, built, tmp = node
    manifest = built.manifest
    fp = bytes.fromhex(manifest.fingerprint)
    start = 3
    shape = (1, *manifest.cut_points[start].shape[1:])
    good = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with _links(tmp) as (ctl, results, out):
        _configure(ctl, tmp, start, manifest.blocks)
        valid = fr.encode_frame(_frame(fp, start, good), KEY)
        wrong_version = bytearray(valid)
        wrong_version[4] = 99
        bad: dict[str, bytes | bytearray] = {
            "garbage": b"not a frame at all",
            "truncated": bytes(valid[: len(valid) // 2]),
            "wrong_version": bytes(wrong_version),
            "untagged": fr.encode_frame(_frame(fp, start, good), None),
            "wrong_key": fr.encode_frame(_frame(fp, start, good), b"k" * 32),
            "wrong_fingerprint": fr.encode_frame(_frame(b"\1" * 32, start, good), KEY),
            "wrong_shape": fr.encode_frame(_frame(fp, start, good[..., :-1]), KEY),
            "beyond_blocks": fr.encode_frame(_frame(fp, manifest.blocks + 5, good), KEY),
        }
        for data in bad.values():
            out.send(data, timeout_ms=5000)
        out.send(valid, timeout_ms=5000)
        result = fr.decode_frame(results.recv(timeout_ms=10_000), key=KEY, max_bytes=1 << 20)
        while result.kind == fr.FrameKind.HEARTBEAT:  # the node's heartbeats share the path
            result = fr.decode_frame(results.recv(timeout_ms=10_000), key=KEY,
                                     max_bytes=1 << 20)
        status = ctl.request(msg.StatusRequest(), timeout_ms=5000)
    assert result.kind == fr.FrameKind.RESULT and result.request_id == 7
    assert [h.node for h in result.trace] == ["w1"]
    assert isinstance(status, msg.NodeStatus)
    assert status.processed == 1
    assert sum(status.dropped.values()) == len(bad), status.dropped
    for reason in ("bad_tag", "wrong_fingerprint", "wrong_shape", "wrong_blocks"):
        assert status.dropped.get(reason, 0) >= 1, (reason, status.dropped)


def test_configure_outside_the_model_is_refused(node: NodeFixture) -> None:
    _worker, built, tmp = node
    with ControlClient(f"ipc://{tmp}/w1.ctl", key=KEY) as ctl:
        ack = ctl.request(msg.Configure(node="w1", start=0, end=built.manifest.blocks + 1,
                                        successor_addr=None, result_addr="ipc:///tmp/x"),
                          timeout_ms=5000)
        wrong_key = ControlClient(f"ipc://{tmp}/w1.ctl", key=b"x" * 32)
        with pytest.raises(Exception, match=r"tag|rejected"):
            wrong_key.request(msg.StatusRequest(), timeout_ms=3000)
        wrong_key.close()
        # still serving after both
        assert isinstance(ctl.request(msg.StatusRequest(), timeout_ms=3000), msg.NodeStatus)
    assert isinstance(ack, msg.Ack) and not ack.ok and "bad range" in ack.reason


def test_source_refuses_a_node_with_another_model_version_and_skips_unreachable(
        built_tiny: BuiltModel, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    other = Node(NodeSettings(name="old", data_addr=f"ipc://{tmp_path}/old.data",
                              control_addr=f"ipc://{tmp_path}/old.ctl",
                              repo=other_version(built_tiny, tmp_path), model_id="tiny"))
    good = Node(NodeSettings(name="good", data_addr=f"ipc://{tmp_path}/good.data",
                             control_addr=f"ipc://{tmp_path}/good.ctl", repo=built_tiny.repo,
                             model_id="tiny"))
    stop = threading.Event()
    threads = [threading.Thread(target=n.run, args=(stop,), daemon=True) for n in (other, good)]
    for t in threads:
        t.start()
    workers = (
        WorkerRef("old", f"ipc://{tmp_path}/old.data", f"ipc://{tmp_path}/old.ctl"),
        WorkerRef("ghost", f"ipc://{tmp_path}/ghost.data", f"ipc://{tmp_path}/ghost.ctl"),
        WorkerRef("good", f"ipc://{tmp_path}/good.data", f"ipc://{tmp_path}/good.ctl"),
    )
    source = Source(SourceSettings(name="source", data_addr=f"ipc://{tmp_path}/src.data",
                                   repo=built_tiny.repo, model_id="tiny", workers=workers,
                                   run_blocks=False, connect_timeout_s=2.0))
    try:
        source.start()
        x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
        result = source.submit(x).result(timeout=10)
        states = {n.name: n.state for n in source.status().nodes}
        refusals = dict(source.refusals)
    finally:
        source.close()
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert [h.node for h in result.path] == ["good"]
    assert states["old"] == "refused" and states["ghost"] == "down" and states["good"] == "up"
    assert any("fingerprint" in r.message for r in caplog.records if "old" in r.message)
    # The refused node is named with the commands that make it serve the source's model.
    assert list(refusals) == ["old"]
    assert f"armdi pack tiny -o tiny.tar --repo {built_tiny.repo}" in refusals["old"]
    assert "copy tiny.tar to old and there run `armdi unpack tiny.tar" in refusals["old"]
    assert any("ghost" in r.message and "did not answer" in r.message for r in caplog.records)


def test_source_rejects_a_wrong_input_shape(built_tiny: BuiltModel, tmp_path: Path) -> None:
    from engines.errors import InputSpecError

    source = Source(SourceSettings(name="source", data_addr=f"ipc://{tmp_path}/src.data",
                                   repo=built_tiny.repo, model_id="tiny", mode="local"))
    source.start()
    try:
        with pytest.raises(InputSpecError, match="shape"):
            source.submit(np.zeros((1, 3, 9, 9), np.float32))
        with pytest.raises(InputSpecError, match="image"):
            source.prepare_image(b"\x89PNG\r\n\x1a\n garbage")
        ok = source.submit(np.zeros((1, 3, 8, 8), np.float32)).result(timeout=10)
    finally:
        source.close()
    assert ok.output.shape == (1, 10)


def test_repository_check_runs_before_serving(built_tiny: BuiltModel) -> None:
    from engines.errors import ArtifactError

    weights = built_tiny.model_dir / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"weights\.bin"):
        Node(NodeSettings(name="w", data_addr="ipc:///tmp/unused.data",
                          control_addr="ipc:///tmp/unused.ctl", repo=built_tiny.repo,
                          model_id="tiny"))
    assert ModelRepository(built_tiny.repo).has_model("tiny")


def test_a_worker_drops_superseded_and_expired_work_and_passes_on_what_is_left(
        node: NodeFixture) -> None:
    """Attempt 2 of a request seen: attempt 1 arriving later is dropped (``superseded``). A
    frame whose attempt budget is used up is dropped (``expired``) instead of computed. A
    frame in time is computed, and leaves with its budget less the time it spent here."""
    from appliance.wire import ext

    _worker, built, tmp = node
    manifest = built.manifest
    fp = bytes.fromhex(manifest.fingerprint)
    start = 3
    shape = (1, *manifest.cut_points[start].shape[1:])
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    with _links(tmp) as (ctl, results, out):
        _configure(ctl, tmp, start, manifest.blocks)

        def send(request_id: int, attempt: int, budget_ms: float) -> None:
            frame = _frame(fp, start, x, request_id=request_id, attempt=attempt,
                           ext=ext.deadline_record(budget_ms) + STAMPS.next())
            out.send(fr.encode_frame(frame, KEY), timeout_ms=5000)

        send(20, 2, 60_000)
        send(20, 1, 60_000)  # the older attempt, after the newer one: superseded
        send(21, 1, 0)  # no time left: expired
        send(22, 1, 60_000)
        got: list[fr.Frame] = []
        while len(got) < 2:
            frame = fr.decode_frame(results.recv(timeout_ms=10_000), key=KEY,
                                    max_bytes=1 << 20)
            if frame.kind != fr.FrameKind.HEARTBEAT:
                got.append(frame)
        status = ctl.request(msg.StatusRequest(), timeout_ms=5000)
    assert [(f.request_id, f.attempt) for f in got] == [(20, 2), (22, 1)]
    for frame in got:
        left = ext.budget_ms(frame.ext)
        assert left is not None and 0 < left < 60_000  # what is left, less its time here
    assert isinstance(status, msg.NodeStatus)
    assert status.processed == 2
    assert status.dropped.get("superseded") == 1 and status.dropped.get("expired") == 1, \
        status.dropped


def test_a_new_source_run_is_not_taken_for_an_old_attempt(node: NodeFixture) -> None:
    """Request ids start afresh with each source run (a new session in Configure): attempt 1
    of request 30 of the new run is not 'superseded' by attempt 3 of the old run's 30."""
    _worker, built, tmp = node
    manifest = built.manifest
    fp = bytes.fromhex(manifest.fingerprint)
    start = 3
    x = np.zeros((1, *manifest.cut_points[start].shape[1:]), np.float32)
    with _links(tmp) as (ctl, results, out):
        got = []
        for attempt in (3, 1):
            run = Stamper()  # a source run: its own session
            _configure(ctl, tmp, start, manifest.blocks, session=run.session.hex())
            frame = _frame(fp, start, x, request_id=30, attempt=attempt, ext=run.next())
            out.send(fr.encode_frame(frame, KEY), timeout_ms=5000)
            while True:
                answer = fr.decode_frame(results.recv(timeout_ms=10_000), key=KEY,
                                         max_bytes=1 << 20)
                if answer.kind != fr.FrameKind.HEARTBEAT:
                    got.append((answer.request_id, answer.attempt))
                    break
        status = ctl.request(msg.StatusRequest(), timeout_ms=5000)
    assert got == [(30, 3), (30, 1)]
    assert isinstance(status, msg.NodeStatus) and not status.dropped.get("superseded")
