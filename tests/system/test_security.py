"""Security on real sockets: a node with a wrong key or certificate can neither join nor
inject; a captured frame replayed is rejected; a TLS cluster gives the same answers as a
plain one (worker processes, mutual TLS on tls+tcp:// over loopback)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from appliance.cluster import free_tcp_ports
from appliance.data.node import Node, NodeSettings
from appliance.data.source import Source, SourceSettings, WorkerRef
from appliance.keys import init_keys
from appliance.wire import frames as fr
from appliance.wire import messages as msg
from appliance.wire.replay import Stamper
from appliance.wire.transport import (
    ControlClient,
    DataInbox,
    DataOutbox,
    TlsFiles,
    TransportTimeout,
)
from tests.conftest import BuiltModel
from tests.system.conftest import cluster, submit_all
from tests.system.test_pipeline import photo_variants, reference

KEY = bytes(range(32))
WRONG_KEY = b"w" * 32


@contextlib.contextmanager
def nodes(*settings: NodeSettings) -> Iterator[list[Node]]:
    """In-process worker nodes on their own threads, stopped on exit."""
    workers = [Node(s) for s in settings]
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,), daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    try:
        yield workers
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)


def _x(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, 8, 8)).astype(np.float32)


def _activation(built: BuiltModel, ext: bytes) -> fr.Frame:
    return fr.Frame(kind=fr.FrameKind.ACTIVATION, request_id=4242, attempt=1,
                    fingerprint=bytes.fromhex(built.manifest.fingerprint), start_block=0,
                    tensor=_x(), ext=ext)


def test_a_node_with_a_wrong_key_can_neither_join_nor_inject(
        built_tiny: BuiltModel, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    addr = {n: (f"ipc://{tmp_path}/{n}.data", f"ipc://{tmp_path}/{n}.ctl")
            for n in ("good", "rogue")}
    settings = [NodeSettings(name=n, data_addr=addr[n][0], control_addr=addr[n][1],
                             repo=built_tiny.repo, model_id="tiny", key=k)
                for n, k in (("good", KEY), ("rogue", WRONG_KEY))]
    source = Source(SourceSettings(
        name="source", data_addr=f"ipc://{tmp_path}/src.data", repo=built_tiny.repo,
        model_id="tiny", key=KEY, run_blocks=False, connect_timeout_s=3.0,
        workers=(WorkerRef("rogue", *addr["rogue"]), WorkerRef("good", *addr["good"]))))
    with nodes(*settings) as (good, _rogue):
        try:
            source.start()
            states = {n.name: (n.state, n.reason) for n in source.status().nodes}
            # The rogue, with its key, tries to join (Hello), to take blocks (Configure) and
            # to inject frames into the chain and results into the source.
            with ControlClient(addr["good"][1], key=WRONG_KEY) as ctl, \
                    pytest.raises(msg.MessageError):
                ctl.request(msg.Configure(node="good", start=0, end=1, successor_addr=None,
                                          result_addr=addr["rogue"][0]), timeout_ms=3000)
            forged = _activation(built_tiny, source._stamper.next())
            with DataOutbox(addr["good"][0]) as out, \
                    DataOutbox(f"ipc://{tmp_path}/src.data") as to_source:
                out.send(fr.encode_frame(forged, WRONG_KEY), timeout_ms=3000)
                out.send(fr.encode_frame(forged, None), timeout_ms=3000)
                result = fr.Frame(kind=fr.FrameKind.RESULT, request_id=1, attempt=1,
                                  fingerprint=forged.fingerprint, start_block=11,
                                  tensor=np.zeros((1, 10), np.float32), ext=forged.ext)
                to_source.send(fr.encode_frame(result, WRONG_KEY), timeout_ms=3000)
                answer = source.submit(_x(2)).result(timeout=20)  # the chain still serves
            status = good.status()
            counters = source.status().counters
        finally:
            source.close()
    assert states["rogue"][0] == "refused", states
    assert "same cluster key" in states["rogue"][1]
    assert states["good"][0] == "up"
    assert [h.node for h in answer.path] == ["good"] and answer.request_id == 1
    assert status.dropped.get("bad_tag") == 2 and status.processed == 1, status.dropped
    assert counters.get("bad_frame") == 1, counters
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "worker rogue refused" in logged and "tag" in logged


def _tls_node(built: BuiltModel, name: str, files: TlsFiles,
              ports: Iterator[int]) -> NodeSettings:
    return NodeSettings(name=name, data_addr=f"tls+tcp://127.0.0.1:{next(ports)}",
                        control_addr=f"tls+tcp://127.0.0.1:{next(ports)}",
                        repo=built.repo, model_id="tiny", key=KEY, tls=files)


def test_a_node_with_a_wrong_certificate_can_neither_join_nor_inject(
        built_tiny: BuiltModel, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ours = init_keys(tmp_path / "ours", ["source", "good"])
    theirs = init_keys(tmp_path / "theirs", ["rogue"])
    ports = iter(free_tcp_ports(5))
    good_settings = _tls_node(built_tiny, "good", TlsFiles(ours.ca_cert, ours.node_pems["good"]),
                              ports)
    # The rogue has the cluster key, but a certificate of another CA.
    rogue_files = TlsFiles(ours.ca_cert, theirs.node_pems["rogue"])
    rogue_settings = _tls_node(built_tiny, "rogue", rogue_files, ports)
    source_files = TlsFiles(ours.ca_cert, ours.node_pems["source"])
    data_addr = f"tls+tcp://127.0.0.1:{next(ports)}"
    source = Source(SourceSettings(
        name="source", data_addr=data_addr, repo=built_tiny.repo, model_id="tiny", key=KEY,
        tls=source_files, run_blocks=False, connect_timeout_s=3.0,
        workers=tuple(WorkerRef(s.name, s.data_addr, s.control_addr)
                      for s in (rogue_settings, good_settings))))
    with nodes(good_settings, rogue_settings) as (good, _rogue):
        try:
            source.start()
            states = {n.name: (n.state, n.reason) for n in source.status().nodes}
            frame = fr.encode_frame(_activation(built_tiny, source._stamper.next()), KEY)
            refused = []
            for target in (good_settings.data_addr, data_addr):
                with DataOutbox(target, tls=rogue_files) as out:
                    try:
                        out.send(frame, timeout_ms=1500)
                    except TransportTimeout:
                        refused.append(target)
            answer = source.submit(_x(3)).result(timeout=20)
            status = good.status()
        finally:
            source.close()
    assert states["rogue"][0] == "down" and "certificate" in states["rogue"][1], states
    assert states["good"][0] == "up"
    assert refused == [good_settings.data_addr, data_addr]  # no TLS session: nothing sent
    assert status.processed == 1 and not status.dropped  # only the real request arrived
    assert [h.node for h in answer.path] == ["good"]
    assert any("rogue did not answer" in r.getMessage() for r in caplog.records)


def test_a_captured_frame_replayed_is_rejected(built_tiny: BuiltModel, tmp_path: Path) -> None:
    """A tap between the source and the worker records the real frames; sent again, the
    worker drops each one as a replay. A result replayed to the source is dropped too."""
    w1 = NodeSettings(name="w1", data_addr=f"ipc://{tmp_path}/w1.data",
                      control_addr=f"ipc://{tmp_path}/w1.ctl", repo=built_tiny.repo,
                      model_id="tiny", key=KEY)
    tap_addr = f"ipc://{tmp_path}/tap.data"
    captured: list[bytes] = []
    stop = threading.Event()

    def tap(inbox: DataInbox) -> None:
        with DataOutbox(w1.data_addr) as onward:
            while not stop.is_set():
                try:
                    data = bytes(inbox.recv(timeout_ms=100))
                except TransportTimeout:
                    continue
                captured.append(data)
                onward.send(data, timeout_ms=3000)

    source = Source(SourceSettings(
        name="source", data_addr=f"ipc://{tmp_path}/src.data", repo=built_tiny.repo,
        model_id="tiny", key=KEY, run_blocks=False,
        workers=(WorkerRef("w1", tap_addr, w1.control_addr),)))
    with nodes(w1) as (worker,), DataInbox(tap_addr, max_bytes=1 << 20) as tap_inbox:
        thread = threading.Thread(target=tap, args=(tap_inbox,), daemon=True)
        thread.start()
        try:
            source.start()
            first = [f.result(timeout=20) for f in submit_all(source, np.stack(
                [_x(i)[0] for i in range(3)]))]
            with DataOutbox(w1.data_addr) as replayer:
                for data in captured:
                    replayer.send(data, timeout_ms=3000)
                # and a result the source already took, replayed to it
                result = fr.Frame(kind=fr.FrameKind.RESULT, request_id=99, attempt=1,
                                  fingerprint=bytes.fromhex(built_tiny.manifest.fingerprint),
                                  start_block=built_tiny.manifest.blocks,
                                  tensor=np.zeros((1, 10), np.float32),
                                  ext=source._stamper.next())
                # and a heartbeat (a worker stamps its own): replayed, it keeps nobody alive
                beat = fr.Frame(kind=fr.FrameKind.HEARTBEAT, request_id=1, attempt=0,
                                fingerprint=result.fingerprint, start_block=0,
                                tensor=np.zeros(0, np.float32),
                                trace=(fr.TraceEntry("w1", 0, 0, 0.0),), ext=Stamper().next())
                to_source = DataOutbox(f"ipc://{tmp_path}/src.data")
                for frame in (result, result, beat, beat):
                    to_source.send(fr.encode_frame(frame, KEY), timeout_ms=3000)
                to_source.close()
                after = source.submit(_x(7)).result(timeout=20)  # new frames still pass
            # the replays came on other connections: NNG does not order them against the
            # frames that followed, so give the worker and the source a moment to have
            # looked at all of them
            deadline = time.monotonic() + 10
            while ((worker.status().dropped.get("replay", 0) < 3
                    or source.status().counters.get("replay", 0) < 2)
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            status = worker.status()
            counters = source.status().counters
        finally:
            stop.set()
            thread.join(timeout=5)
            source.close()
    assert len(first) == 3 and len(captured) == 4
    assert status.dropped == {"replay": 3}, status.dropped
    assert status.processed == 4
    assert after.request_id == 4
    # the first copy of the result is new (an unknown request: a duplicate), the second a replay
    # the second copies of the result and of the heartbeat are replays
    assert counters.get("replay") == 2 and counters.get("duplicate_results") == 1, counters


def test_a_tls_cluster_passes_the_same_correctness_test_as_a_plain_one(
        lite_repo: BuiltModel, tmp_path: Path) -> None:
    """As test_pipeline's three-node test (float32), over mutual TLS with HMAC tags."""
    inputs = photo_variants(lite_repo.manifest.preprocessing, 100)
    expected = reference(str(lite_repo.source), inputs)
    with cluster(lite_repo.repo, "efficientnet_lite0", tmp_path, nodes=3, min_workers=3,
                 transport="tls", key_hex=KEY.hex()) as source:
        assert all(w.ref.data_addr.startswith("tls+tcp://") for w in source.workers)
        assert source.allocation is not None
        b = source.allocation.boundaries
        assert len([n for n in range(len(b) - 1) if b[n] < b[n + 1]]) >= 3, b
        results = [f.result(timeout=60) for f in submit_all(source, inputs)]
        status = source.status()
    got = np.concatenate([r.output for r in results])
    assert np.max(np.abs(got - expected)) <= 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert status.completed == len(inputs) and status.failed == 0
    assert {h.node for r in results for h in r.path} >= {"w1", "w2", "w3"}
