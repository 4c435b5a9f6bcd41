"""The worker's one-loop data path: frames arriving during a compute wait in NNG's buffer and
are not lost; a successor that stops reading pushes back all the way to the sender; uint8
pixels are normalised by the node that runs block 0.

A real node in this process (its own data and control threads), real pynng sockets.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from appliance.data.node import Node, NodeSettings
from appliance.wire import frames as fr
from appliance.wire import messages as msg
from appliance.wire.transport import ControlClient, DataInbox, DataOutbox, TransportTimeout
from engines.preprocess import Normaliser
from tests.conftest import BuiltModel, run_onnx

SlowNode = tuple[BuiltModel, Path]  # the model a slow worker runs, its directory

DEPTH = 2  # frames NNG buffers on receive, and again on send


@pytest.fixture
def slow_node(built_tiny: BuiltModel, tmp_path: Path) -> Iterator[SlowNode]:
    """A worker whose every frame takes ~20 ms (really computed, then waited: slowdown)."""
    settings = NodeSettings(name="w1", data_addr=f"ipc://{tmp_path}/w1.data",
                            control_addr=f"ipc://{tmp_path}/w1.ctl", repo=built_tiny.repo,
                            model_id="tiny", slowdown=200.0, queue_depth=DEPTH,
                            send_timeout_ms=60_000)
    stop = threading.Event()
    thread = threading.Thread(target=Node(settings).run, args=(stop,), daemon=True)
    thread.start()
    yield built_tiny, tmp_path
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()


def _configure(tmp: Path, start: int, end: int, result_addr: str) -> None:
    with ControlClient(f"ipc://{tmp}/w1.ctl", key=None) as ctl:
        ack = ctl.request(msg.Configure(node="w1", start=start, end=end, successor_addr=None,
                                        result_addr=result_addr), timeout_ms=10_000)
    assert isinstance(ack, msg.Ack) and ack.ok, ack


def _frame(built: BuiltModel, request_id: int, tensor: np.ndarray, start: int = 0) -> bytes:
    return bytes(fr.encode_frame(fr.Frame(
        kind=fr.FrameKind.ACTIVATION, request_id=request_id, attempt=1,
        fingerprint=bytes.fromhex(built.manifest.fingerprint), start_block=start,
        tensor=tensor), None))


def _result(inbox: DataInbox) -> fr.Frame:
    """The next RESULT (or ERROR) frame, past the node's heartbeats."""
    while True:
        frame = fr.decode_frame(inbox.recv(timeout_ms=20_000), key=None, max_bytes=1 << 24)
        if frame.kind != fr.FrameKind.HEARTBEAT:
            return frame


def _input(built: BuiltModel, seed: int) -> np.ndarray:
    shape = (1, *built.manifest.input.shape[1:])
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_frames_sent_during_a_compute_are_buffered_in_order_none_lost(slow_node: SlowNode) -> None:
    built, tmp = slow_node
    blocks = built.manifest.blocks
    with DataInbox(f"ipc://{tmp}/results.data", max_bytes=1 << 24) as results, \
            DataOutbox(f"ipc://{tmp}/w1.data") as out:
        _configure(tmp, 0, blocks, f"ipc://{tmp}/results.data")
        inputs = [_input(built, i) for i in range(6)]
        for i, x in enumerate(inputs):  # back to back: more than the node's buffer holds
            out.send(_frame(built, i, x), timeout_ms=10_000)
        got = [_result(results) for _ in inputs]
    assert [g.request_id for g in got] == list(range(6))
    expected = run_onnx(built.model_dir / "model.onnx", np.concatenate(inputs))[0]
    np.testing.assert_allclose(np.concatenate([g.tensor for g in got]), expected, atol=1e-5)


def test_a_successor_that_stops_reading_pushes_back_to_the_sender(slow_node: SlowNode) -> None:
    """Nothing reads the node's results: its send buffer fills, its loop blocks on the send,
    it stops receiving, its receive buffer fills, and the sender's send times out — after a
    bounded number of frames, none of which is lost once the successor reads again."""
    built, tmp = slow_node
    big = 1 << 20  # 1 MiB frames: the kernel's socket buffers hold few of them
    start = built.manifest.blocks - 1
    shape = (1, *built.manifest.cut_points[start].shape[1:])
    with DataInbox(f"ipc://{tmp}/results.data", max_bytes=1 << 24,
                   recv_buffer=DEPTH) as results, \
            DataOutbox(f"ipc://{tmp}/w1.data") as out:
        _configure(tmp, start, built.manifest.blocks, f"ipc://{tmp}/results.data")
        # results are as big as the inputs here: pad each frame's payload to 1 MiB of rows
        rows = max(1, big // (int(np.prod(shape)) * 4))
        x = np.random.default_rng(0).standard_normal((rows, *shape[1:])).astype(np.float32)
        accepted = 0
        with pytest.raises(TransportTimeout):
            for i in range(200):
                out.send(_frame(built, i, x, start), timeout_ms=1500)
                accepted += 1
        assert 2 * DEPTH <= accepted < 60, accepted  # buffered, then bounded
        received: list[int] = []
        while len(received) < accepted:
            received.append(_result(results).request_id)
    assert received == list(range(accepted))


def test_uint8_pixels_are_normalised_by_the_node_running_block_0(slow_node: SlowNode) -> None:
    built, tmp = slow_node
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (1, *built.manifest.input.shape[1:]), dtype=np.uint8)
    with DataInbox(f"ipc://{tmp}/results.data", max_bytes=1 << 24) as results, \
            DataOutbox(f"ipc://{tmp}/w1.data") as out:
        _configure(tmp, 0, built.manifest.blocks, f"ipc://{tmp}/results.data")
        out.send(_frame(built, 1, pixels), timeout_ms=10_000)
        inner = rng.integers(0, 256, (1, *built.manifest.cut_points[1].shape[1:]), np.uint8)
        out.send(_frame(built, 2, inner, start=1), timeout_ms=10_000)  # pixels past block 0
        out.send(_frame(built, 3, _input(built, 0)), timeout_ms=10_000)
        got = [_result(results) for _ in range(2)]
        with ControlClient(f"ipc://{tmp}/w1.ctl", key=None) as ctl:
            status = ctl.request(msg.StatusRequest(), timeout_ms=5000)
    assert [g.request_id for g in got] == [1, 3]
    expected = run_onnx(built.model_dir / "model.onnx",
                        Normaliser(built.manifest.preprocessing)(pixels))[0]
    np.testing.assert_allclose(got[0].tensor, expected, atol=1e-5)
    assert isinstance(status, msg.NodeStatus) and status.dropped == {"wrong_dtype": 1}
