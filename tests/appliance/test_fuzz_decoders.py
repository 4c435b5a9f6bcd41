"""Property-based fuzzing of what a node parses from the network, and of the manifest loader.

Each decoder gets ``tests.fuzz.inputs()`` inputs (10,000 in ``make test``). Hypothesis draws a
seed (and a key); the seed makes ``VARIANTS`` inputs from valid ones: bytes set, header
fields set to edge values, cut, inserted, deleted; JSON values replaced by edge values or
removed (inside a well-formed, tagged envelope, so the checks behind the tag are reached);
and plain random bytes. The property: the decoder returns a value that round-trips, or
raises its own error (``FrameError``, ``MessageError``, ``ManifestError``); never anything
else, and never a hang (pytest-timeout bounds the run). A failure prints the seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.wire import frames as fr
from appliance.wire import messages as msg
from appliance.wire.replay import ReplayError, read_stamp, stamp_record
from engines.errors import ManifestError
from engines.repository import ModelRepository
from tests.conftest import BuiltModel
from tests.fuzz import fuzz_settings, inputs

pytestmark = pytest.mark.fuzz

KEY = bytes(range(32))
N = inputs()
VARIANTS = 10  # inputs made from each seed hypothesis draws
RAN: dict[str, int] = {"frames": 0, "messages": 0, "manifest": 0}

# ---------------------------------------------------------------------------- mutations
# Header fields worth overwriting with edge values: (offset, struct format).
_FIELDS = ((4, "<B"), (5, "<B"), (6, "<H"), (20, "<B"), (21, "<B"), (22, "<H"), (24, "<H"),
           (26, "<H"), (28, "<I"), (64, "<I"))
# Values that break parsers: wrong types, extremes, empties, nesting.
_EDGES: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, -(2**63), 10**30, 0.5, -0.0, 1e308,
    float("inf"), float("-inf"), float("nan"), "", "x", "a" * 300, "\u0000", "é", "0" * 64,
    "tls+tcp://h:1", [], [None], [1, 2, 3], ["a"], {}, {"a": 1}, {"type": "ack"}, [[[[]]]],
    {"v": {"v": {}}})


def mutate(data: bytes, rnd: random.Random) -> bytes:
    """``data`` with 1-4 random edits."""
    out = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(5)
        if op == 0 and out:
            out[rnd.randrange(len(out))] = rnd.randrange(256)
        elif op == 1:
            at, fmt = rnd.choice(_FIELDS)
            size = struct.calcsize(fmt)
            if at + size <= len(out):
                top = 2 ** (8 * size) - 1
                struct.pack_into(fmt, out, at, rnd.choice((0, 1, top, top // 2 + 1,
                                                           rnd.randint(0, top))))
        elif op == 2:
            del out[rnd.randint(0, len(out)):]
        elif op == 3:
            at = rnd.randint(0, len(out))
            out[at:at] = rnd.randbytes(rnd.randint(1, 16))
        elif out:
            at = rnd.randrange(len(out))
            del out[at : at + rnd.randint(1, 16)]
    return bytes(out)


def variants(bases: tuple[bytes, ...], rnd: random.Random, count: int) -> list[bytes]:
    """``count`` inputs: mostly mutated bases, some random bytes, some bases as they are."""
    out = []
    for _ in range(count):
        roll = rnd.random()
        if roll < 0.1:
            out.append(rnd.randbytes(rnd.randint(0, 200)))
        elif roll < 0.2:
            out.append(rnd.choice(bases))
        else:
            out.append(mutate(rnd.choice(bases), rnd))
    return out


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            found += _paths(v, (*prefix, i))
    return found


_PATHS: dict[int, tuple[Any, list[tuple[Any, ...]]]] = {}


def _paths_of(doc: Any) -> list[tuple[Any, ...]]:
    """Every path into ``doc`` (cached: the bases are fixed documents)."""
    cached = _PATHS.get(id(doc))
    if cached is None or cached[0] is not doc:
        cached = _PATHS[id(doc)] = (doc, _paths(doc))
    return cached[1]


def _replace_at(doc: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    if not path:
        return value
    head, *rest = path
    if isinstance(doc, dict) and head in doc:
        out = dict(doc)
        if delete and not rest:
            del out[head]
        else:
            out[head] = _replace_at(doc[head], tuple(rest), value, delete)
        return out
    if isinstance(doc, list) and isinstance(head, int) and head < len(doc):
        items = list(doc)
        items[head] = _replace_at(doc[head], tuple(rest), value, delete)
        return items
    return doc


def json_mutation(doc: Any, rnd: random.Random) -> Any:
    """``doc`` with 1-3 values replaced by edge values, or deleted."""
    paths = _paths_of(doc)
    out = doc
    for _ in range(rnd.randint(1, 3)):
        value = rnd.choice((rnd.choice(_EDGES), rnd.randint(-(2**70), 2**70),
                            rnd.randbytes(rnd.randint(0, 6)).decode("latin-1")))
        out = _replace_at(out, rnd.choice(paths), value, delete=rnd.random() < 0.2)
    return out


# ---------------------------------------------------------------------------- frames
_DTYPES = (np.float32, np.float16, np.uint8, np.int64)


def _pool_frame(rng: np.random.Generator, i: int) -> fr.Frame:
    kind = list(fr.FrameKind)[i % 3]
    shape = tuple(int(d) for d in rng.integers(0, 4, rng.integers(0, 4)))
    tensor = np.arange(int(np.prod(shape)), dtype=_DTYPES[i % len(_DTYPES)]).reshape(shape)
    trace = tuple(fr.TraceEntry(name, int(a), int(a) + int(b), float(ms)) for name, a, b, ms in
                  zip(("w1", "ä", "node-" * 12 + "x"), rng.integers(0, 100, 3),
                      rng.integers(0, 100, 3), rng.random(3), strict=True))[: i % 4]
    ext = (b"", stamp_record(rng.bytes(16), int(rng.integers(0, 2**63))), rng.bytes(9))[i % 3]
    return fr.Frame(kind=kind, request_id=int(rng.integers(0, 2**63)), attempt=i % 7,
                    fingerprint=rng.bytes(32), start_block=int(rng.integers(0, 50)),
                    tensor=tensor, trace=trace, ext=ext,
                    error="engine failed: é" if kind == fr.FrameKind.ERROR else "")


_RNG = np.random.default_rng(14)
# Valid frames of every kind, dtype, up to 3 dims and 3 trace entries, with and without a
# stamp or other extension bytes, encoded with and without a tag.
FRAME_POOL = tuple(bytes(fr.encode_frame(_pool_frame(_RNG, i), (None, KEY)[i % 2]))
                   for i in range(240))


def _same(a: fr.Frame, b: fr.Frame) -> bool:
    return (a.kind, a.request_id, a.attempt, a.fingerprint, a.start_block, a.error, a.ext,
            a.trace_wire, a.tensor.dtype, a.tensor.shape, a.tensor.tobytes()) == (
        b.kind, b.request_id, b.attempt, b.fingerprint, b.start_block, b.error, b.ext,
        b.trace_wire, b.tensor.dtype, b.tensor.shape, b.tensor.tobytes())


def check_frame_input(data: bytes, key: bytes | None) -> None:
    RAN["frames"] += 1
    try:
        frame = fr.decode_frame(data, key=key, max_bytes=1 << 16)
    except fr.FrameError:
        return
    assert frame.trace is not None  # parses (the decoder walked it already)
    again = fr.decode_frame(fr.encode_frame(frame, key), key=key, max_bytes=1 << 16)
    assert _same(frame, again)
    with contextlib.suppress(ReplayError):
        read_stamp(frame.ext)


@fuzz_settings(N // VARIANTS)
@given(st.integers(0, 2**64), st.sampled_from((None, KEY)))
def test_fuzz_frame_decoder(seed: int, key: bytes | None) -> None:
    for data in variants(FRAME_POOL, random.Random(seed), VARIANTS):
        check_frame_input(data, key)


def test_frame_regressions() -> None:
    """Edge inputs of the frame decoder, kept."""
    valid = fr.encode_frame(fr.Frame(kind=fr.FrameKind.ACTIVATION, request_id=1, attempt=1,
                                     fingerprint=bytes(32), start_block=0,
                                     tensor=np.zeros((2, 2), np.float32)), None)
    huge = bytearray(valid)
    struct.pack_into("<I", huge, 64, 0xFFFF_FFFF)  # a dim of 2**32-1
    for data in (b"", b"ARMD", bytes(valid[:63]), bytes(valid) + b"\0", bytes(huge)):
        with pytest.raises(fr.FrameError):
            fr.decode_frame(data, key=None, max_bytes=1 << 16)


# ---------------------------------------------------------------------------- messages
_MESSAGES: tuple[msg.ControlMessage, ...] = (
    msg.Hello(node="source", fingerprint="a" * 64, model_id="m", blocks=12, backends=("ort",)),
    msg.HelloReply(node="w1", fingerprint="a" * 64, ok=False, reason="no"),
    msg.Configure(node="w1", start=1, end=3, successor_addr="ipc:///x", result_addr="ipc:///y",
                  chain=("source", "w1"), adaptive=True, predecessor="source",
                  predecessor_control_addr="ipc:///z", upstream_Bps=1e6, session="0" * 32),
    msg.MoveBoundary(node="w2", boundary=4, reason="r"),
    msg.SetSlowdown(factor=2.0),
    msg.Ack(ok=True),
    msg.StatusRequest(),
    msg.NodeStatus(node="w1", start=0, end=2, queue_depth=0, queue_capacity=8, processed=3,
                   dropped={"bad_tag": 1}, slowdown=1.0),
    msg.Heartbeat(node="w1", seq=3, sent_at=1.5),
    msg.StageReport(node="w1", start=0, end=2, compute_ms=1.0, send_ms=0.5, samples=3),
    msg.Shutdown(reason="bye"),
)
_MESSAGE_DOCS = tuple(json.loads(m.model_dump_json()) for m in _MESSAGES)
_ENVELOPES = tuple(msg.encode_message(m, k) for m in _MESSAGES for k in (None, KEY))


def _envelope(doc: Any, key: bytes | None) -> bytes:
    data = (msg.MAGIC + bytes((msg.ENVELOPE_VERSION, msg.FLAG_TAGGED if key else 0))
            + json.dumps(doc).encode())
    return data + (hmac.digest(key, data, hashlib.sha256) if key is not None else b"")


def check_message_input(data: bytes, key: bytes | None) -> None:
    RAN["messages"] += 1
    try:
        message = msg.decode_message(data, key)
    except msg.MessageError:
        return
    assert msg.decode_message(msg.encode_message(message, key), key) == message


@fuzz_settings(N // VARIANTS)
@given(st.integers(0, 2**64), st.sampled_from((None, KEY)))
def test_fuzz_control_message_decoder(seed: int, key: bytes | None) -> None:
    rnd = random.Random(seed)
    for data in variants(_ENVELOPES, rnd, VARIANTS // 2):
        check_message_input(data, key)
    for _ in range(VARIANTS - VARIANTS // 2):
        check_message_input(_envelope(json_mutation(rnd.choice(_MESSAGE_DOCS), rnd), key), key)


@pytest.mark.parametrize("body", [
    b'{"type": ["ack"], "ok": true}',  # found by the fuzzer: an unhashable type crashed it
    b'{"type": "heartbeat", "node": "w1", "seq": 1, "sent_at": Infinity}',  # found by the
    # fuzzer: decoded, but re-encoded as null (an infinite float cannot travel as JSON)
    b"[" * 100_000,  # nesting deeper than the recursion limit
    b'{"type": "ack", "ok": true, "v": ' + b"9" * 5000 + b"}",  # over Python's digit limit
])
def test_message_regressions(body: bytes) -> None:
    data = msg.MAGIC + bytes((msg.ENVELOPE_VERSION, 0)) + body
    with pytest.raises(msg.MessageError):
        msg.decode_message(data, None)


# ---------------------------------------------------------------------------- manifest
@pytest.fixture(scope="module")
def manifest_doc(built_tiny_session: BuiltModel) -> tuple[ModelRepository, Any]:
    repo = ModelRepository(built_tiny_session.repo)
    return repo, json.loads((repo.model_dir("tiny") / "manifest.json").read_text())


def test_fuzz_manifest_loader(manifest_doc: tuple[ModelRepository, Any]) -> None:
    repo, doc = manifest_doc
    raw_valid = json.dumps(doc).encode()
    assert repo.parse_manifest(raw_valid, "tiny").model_id == "tiny"

    def check(raw: bytes) -> None:
        RAN["manifest"] += 1
        try:
            manifest = repo.parse_manifest(raw, "tiny", Path("manifest.json"))
        except ManifestError:
            return
        assert manifest.fingerprint == manifest.content_fingerprint()

    @fuzz_settings(N // VARIANTS)
    @given(st.integers(0, 2**64))
    def run(seed: int) -> None:
        rnd = random.Random(seed)
        for raw in variants((raw_valid,), rnd, VARIANTS // 2):
            check(raw)
        for _ in range(VARIANTS - VARIANTS // 2):
            check(json.dumps(json_mutation(doc, rnd)).encode())

    run()


@pytest.mark.parametrize("raw", [
    b"[" * 100_000,  # nesting deeper than the recursion limit
    b'{"schema_version": ' + b"9" * 5000 + b"}",  # an int over Python's digit limit
    b"\xff\xfe\x00",  # not utf-8
])
def test_manifest_regressions(manifest_doc: tuple[ModelRepository, Any], raw: bytes) -> None:
    repo, _doc = manifest_doc
    with pytest.raises(ManifestError):
        repo.parse_manifest(raw, "tiny")


def test_every_decoder_ran_its_inputs() -> None:
    """The figure for the closing note: inputs per decoder in this run (when all ran)."""
    if 0 in RAN.values():
        pytest.skip(f"not every fuzz test ran in this session: {RAN}")
    print(f"fuzzed inputs: {RAN}")
    assert min(RAN.values()) >= N, RAN
