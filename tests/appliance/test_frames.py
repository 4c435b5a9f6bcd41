"""Activation frames: round trips, zero-copy decode, and every malformation as a FrameError."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from appliance.wire import frames as fr
from tests.conftest import needs_c_codec

FP = hashlib.sha256(b"model").digest()
KEY = b"cluster-key"
LIMIT = 1 << 20
DTYPES = ("float32", "float16", "uint8", "int64")


def make(tensor: np.ndarray | None = None, **changes: Any) -> fr.Frame:
    base = fr.Frame(kind=fr.FrameKind.ACTIVATION, request_id=42, attempt=1, fingerprint=FP,
                    start_block=3, tensor=np.arange(6, dtype=np.float32).reshape(2, 3)
                    if tensor is None else tensor,
                    trace=(fr.TraceEntry(node="source", start=0, end=3, ms=1.25),))
    return base.replace(**changes)


def assert_same(a: fr.Frame, b: fr.Frame) -> None:
    assert (a.kind, a.request_id, a.attempt, a.fingerprint, a.start_block, a.error) == (
        b.kind, b.request_id, b.attempt, b.fingerprint, b.start_block, b.error)
    assert a.tensor.dtype == b.tensor.dtype and a.tensor.shape == b.tensor.shape
    np.testing.assert_array_equal(a.tensor, b.tensor)
    assert len(a.trace) == len(b.trace)
    for x, y in zip(a.trace, b.trace, strict=True):
        assert (x.node, x.start, x.end) == (y.node, y.start, y.end)
        assert np.float32(x.ms) == np.float32(y.ms)


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("key", [None, KEY])
@pytest.mark.parametrize("kind", list(fr.FrameKind))
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_every_dtype_and_kind(dtype: str, kind: fr.FrameKind,
                                         key: bytes | None) -> None:
    tensor = (np.arange(2 * 3 * 5) % 200).astype(dtype).reshape(2, 3, 5)
    frame = make(tensor, kind=kind, error="engine failed" if kind == fr.FrameKind.ERROR else "")
    data = fr.encode_frame(frame, key)
    assert isinstance(data, bytearray)
    assert_same(fr.decode_frame(data, key=key, max_bytes=LIMIT), frame)


def test_round_trip_edge_shapes_and_unicode_trace() -> None:
    for tensor in (np.array(7.0, dtype=np.float32), np.zeros((0, 4), np.float32),
                   np.ones((1,) * 8, np.int64)):
        trace = tuple(fr.TraceEntry(node=f"nöde-{i}" * 3, start=i, end=i + 1, ms=i / 3)
                      for i in range(fr.MAX_TRACE))
        frame = make(tensor, trace=trace, request_id=2**64 - 1, attempt=65535)
        assert_same(fr.decode_frame(fr.encode_frame(frame, KEY), key=KEY, max_bytes=LIMIT),
                    frame)


def test_non_contiguous_and_big_endian_tensors_are_encoded_in_c_order() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    for tensor in (base.T, base[:, ::2], base.astype(">f4")):
        out = fr.decode_frame(fr.encode_frame(make(tensor), None), key=None, max_bytes=LIMIT)
        np.testing.assert_array_equal(out.tensor, tensor)
        assert out.tensor.dtype == np.dtype("<f4")


def test_decode_is_zero_copy_and_aligned() -> None:
    for dtype in DTYPES:
        data = fr.encode_frame(make(np.ones((3, 5), dtype)), KEY)
        frame = fr.decode_frame(data, key=KEY, max_bytes=LIMIT)
        assert np.shares_memory(frame.tensor, np.frombuffer(data, np.uint8))
        offset = frame.tensor.ctypes.data - np.frombuffer(data, np.uint8).ctypes.data
        assert offset % fr.PAYLOAD_ALIGN == 0
        assert offset + frame.tensor.nbytes + fr.TAG_BYTES == len(data)


def test_decode_accepts_bytes_and_memoryview() -> None:
    data = fr.encode_frame(make(), None)
    for buf in (bytes(data), memoryview(data), memoryview(bytes(data))):
        assert_same(fr.decode_frame(buf, key=None, max_bytes=LIMIT), make())


@settings(max_examples=60, deadline=None)
@given(
    tensor=hnp.arrays(st.sampled_from([np.float32, np.float16, np.uint8, np.int64]),
                      hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)),
    kind=st.sampled_from(list(fr.FrameKind)),
    request_id=st.integers(0, 2**64 - 1),
    attempt=st.integers(0, 65535),
    start_block=st.integers(0, 65535),
    fingerprint=st.binary(min_size=32, max_size=32),
    trace=st.lists(st.builds(fr.TraceEntry, node=st.text(min_size=1, max_size=16),
                             start=st.integers(0, 10), end=st.integers(10, 65535),
                             ms=st.floats(0, 1e6, width=32)), max_size=5),
    key=st.one_of(st.none(), st.binary(min_size=1, max_size=64)),
)
def test_round_trip_property(tensor: np.ndarray, kind: fr.FrameKind, request_id: int,
                             attempt: int, start_block: int, fingerprint: bytes,
                             trace: list[fr.TraceEntry], key: bytes | None) -> None:
    frame = fr.Frame(kind=kind, request_id=request_id, attempt=attempt,
                     fingerprint=fingerprint, start_block=start_block, tensor=tensor,
                     trace=tuple(trace), error="boom" if kind == fr.FrameKind.ERROR else "")
    assert_same(fr.decode_frame(fr.encode_frame(frame, key), key=key, max_bytes=LIMIT), frame)


# ---------------------------------------------------------------------------- wire dtype
def test_cast_for_wire_and_back() -> None:
    x = np.linspace(-3, 3, 50, dtype=np.float32).reshape(5, 10)
    half = fr.cast_for_wire(x, "float16")
    assert half.dtype == np.float16
    back = fr.to_compute_dtype(half)
    assert back.dtype == np.float32 and np.abs(back - x).max() < 2e-3
    assert fr.cast_for_wire(x, "float32") is x
    ids = np.arange(4, dtype=np.int64)
    assert fr.cast_for_wire(ids, "float16") is ids and fr.to_compute_dtype(ids) is ids
    with pytest.raises(fr.InvalidFrameError):
        fr.cast_for_wire(x, "bfloat16")  # type: ignore[arg-type]


def test_fingerprint_from_hex() -> None:
    assert fr.fingerprint_from_hex(FP.hex()) == FP
    for bad in ("zz" * 32, "ab" * 31):
        with pytest.raises(fr.InvalidFrameError):
            fr.fingerprint_from_hex(bad)


# ---------------------------------------------------------------------------- invalid frames
@pytest.mark.parametrize("changes", [
    {"request_id": -1}, {"request_id": 2**64}, {"attempt": 70000}, {"start_block": -2},
    {"fingerprint": b"short"}, {"fingerprint": FP.hex()}, {"tensor": [1, 2]},
    {"tensor": np.zeros(2, np.bool_)}, {"tensor": np.zeros((1,) * 9, np.float32)},
    {"trace": tuple(fr.TraceEntry("n", 0, 1, 0.0) for _ in range(65))},
    {"error": "only on ERROR frames"},
    {"kind": fr.FrameKind.ERROR, "error": "x" * 5000},
    {"kind": 1},
])
def test_invalid_frame_values_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(fr.InvalidFrameError):
        make(**changes)


@pytest.mark.parametrize("args", [("", 0, 1, 0.0), ("x" * 65, 0, 1, 0.0), ("n", 3, 2, 0.0),
                                  ("n", 0, 70000, 0.0)])
def test_invalid_trace_entries_are_refused(args: tuple[str, int, int, float]) -> None:
    with pytest.raises(fr.InvalidFrameError):
        fr.TraceEntry(*args)


# ---------------------------------------------------------------------------- malformed bytes
def small() -> bytearray:
    return fr.encode_frame(make(np.arange(4, dtype=np.float32)), None)


def patched(data: bytearray, offset: int, fmt: str, value: object) -> bytearray:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return out


def decode(data: bytes | bytearray, key: bytes | None = None, limit: int = LIMIT) -> fr.Frame:
    return fr.decode_frame(data, key=key, max_bytes=limit)


@pytest.mark.parametrize(("offset", "fmt", "value", "error", "message"), [
    (0, "<4s", b"ARMX", fr.MalformedFrameError, "bad magic"),
    (4, "<B", 1, fr.MalformedFrameError, "unsupported frame format version 1"),
    (4, "<B", 3, fr.MalformedFrameError, "unsupported frame format version 3"),
    (5, "<B", 9, fr.MalformedFrameError, "unknown frame kind 9"),
    (6, "<H", 0x0100, fr.MalformedFrameError, "unknown flags"),
    (20, "<B", 7, fr.MalformedFrameError, "unknown dtype code 7"),
    (21, "<B", 9, fr.MalformedFrameError, "9 dims, at most 8"),
    (24, "<H", 5000, fr.MalformedFrameError, "error message of 5000 bytes"),
    (24, "<H", 1, fr.MalformedFrameError, "only allowed on ERROR"),
    (26, "<H", 5000, fr.MalformedFrameError, "extension of 5000 bytes"),
    (28, "<I", 1, fr.MalformedFrameError, "reserved header field"),
    (64, "<I", 5, fr.MalformedFrameError, "does not match shape (5,)"),
])
def test_header_fields(offset: int, fmt: str, value: object, error: type[fr.FrameError],
                       message: str) -> None:
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode(patched(small(), offset, fmt, value))


def trace_offset(frame: fr.Frame) -> int:
    return fr.HEADER_BYTES + 4 * frame.tensor.ndim


def test_trace_fields() -> None:
    frame = make(np.arange(4, dtype=np.float32))
    data = fr.encode_frame(frame, None)
    at = trace_offset(frame)
    assert data[22:24] == struct.pack("<H", 1 + len("source") + 8)  # the trace's byte length
    with pytest.raises(fr.MalformedFrameError, match="0-byte node name"):
        decode(patched(data, at, "<B", 0))
    with pytest.raises(fr.MalformedFrameError, match="runs past the trace section"):
        decode(patched(data, at, "<B", 20))
    bad_name = bytearray(data)
    bad_name[at + 1] = 0xFF  # first byte of "source"
    with pytest.raises(fr.MalformedFrameError, match="not utf-8"):
        decode(bad_name)
    name_end = at + 1 + len("source")
    with pytest.raises(fr.MalformedFrameError, match=r"blocks \[9, 3\)"):
        decode(patched(data, name_end, "<H", 9))
    many = make(np.arange(4, dtype=np.float32),
                trace=[fr.TraceEntry("n", 0, 0, 0.0)] * fr.MAX_TRACE)
    entry = fr.TraceEntry("n", 0, 0, 0.0).wire()
    too_many = fr.decode_frame(fr.encode_frame(many, None), key=None, max_bytes=LIMIT)
    assert len(too_many.trace) == fr.MAX_TRACE
    with pytest.raises(fr.InvalidFrameError, match="64 entries already"):
        too_many.forward(fr.FrameKind.ACTIVATION, 4, np.zeros(1, np.float32), entry)
    # a 65th entry smuggled in by a sender is refused by the decoder's walk of the section
    with pytest.raises(fr.MalformedFrameError, match="over 64 trace entries"):
        fr._check_trace(entry * (fr.MAX_TRACE + 1))
    assert fr._check_trace(entry * fr.MAX_TRACE) == fr.MAX_TRACE


def test_forward_appends_one_hop_and_keeps_the_request() -> None:
    frame = fr.decode_frame(fr.encode_frame(make(ext=b"later"), KEY), key=KEY, max_bytes=LIMIT)
    hop = fr.hop_wire(fr.node_prefix("w1"), 3, 7, 2.5)
    out = frame.forward(fr.FrameKind.RESULT, 7, np.ones((1, 2), np.float32), hop)
    back = fr.decode_frame(fr.encode_frame(out, KEY), key=KEY, max_bytes=LIMIT)
    assert (back.kind, back.request_id, back.attempt, back.start_block, back.ext) == (
        fr.FrameKind.RESULT, 42, 1, 7, b"later")
    assert [(e.node, e.start, e.end, e.ms) for e in back.trace] == [
        ("source", 0, 3, 1.25), ("w1", 3, 7, 2.5)]
    with pytest.raises(fr.InvalidFrameError, match="only allowed on ERROR"):
        frame.forward(fr.FrameKind.RESULT, 7, np.ones(1, np.float32), hop, error="boom")
    with pytest.raises(fr.InvalidFrameError, match="cannot travel"):
        frame.forward(fr.FrameKind.RESULT, 7, np.ones(1, np.complex64), hop)
    with pytest.raises(AttributeError, match="immutable"):
        frame.start_block = 9  # type: ignore[misc]


def test_nonzero_padding_and_payload_length_mismatch() -> None:
    frame = make(np.arange(4, dtype=np.float32), trace=())
    data = fr.encode_frame(frame, None)
    payload_len_at = len(data) - frame.tensor.nbytes - 8
    header_end = trace_offset(frame)
    assert payload_len_at > header_end, "this frame needs padding for the test to mean anything"
    padded = bytearray(data)
    padded[header_end] = 1
    with pytest.raises(fr.MalformedFrameError, match="non-zero padding"):
        decode(padded)
    with pytest.raises(fr.TruncatedFrameError, match="declares"):
        decode(patched(data, payload_len_at, "<Q", 20))
    with pytest.raises(fr.MalformedFrameError, match="4 unexpected bytes"):
        decode(patched(data, payload_len_at, "<Q", 12))
    with pytest.raises(fr.OversizeFrameError, match="declares"):
        decode(patched(data, payload_len_at, "<Q", 2**63))


def test_oversize() -> None:
    data = small()
    assert decode(data, limit=len(data))
    with pytest.raises(fr.OversizeFrameError, match=f"over the {len(data) - 1} limit"):
        decode(data, limit=len(data) - 1)
    with pytest.raises(fr.OversizeFrameError, match="declares"):
        decode(data[:-1], limit=len(data) - 1)  # a prefix that declares the whole frame


@pytest.mark.parametrize("key", [None, KEY])
def test_truncation_at_every_offset(key: bytes | None) -> None:
    data = fr.encode_frame(make(np.arange(3, dtype=np.float16)), key)
    for cut in range(len(data)):
        with pytest.raises(fr.FrameError) as info:
            decode(data[:cut], key=key)
        assert isinstance(info.value, (fr.TruncatedFrameError, fr.MalformedFrameError)), cut
    with pytest.raises(fr.MalformedFrameError, match="1 unexpected bytes"):
        decode(data + b"\0", key=key)


def test_tags() -> None:
    tagged = fr.encode_frame(make(), KEY)
    plain = fr.encode_frame(make(), None)
    assert len(tagged) == len(plain) + fr.TAG_BYTES
    with pytest.raises(fr.FrameAuthError, match="no tag but a cluster key"):
        decode(plain, key=KEY)
    with pytest.raises(fr.FrameAuthError, match="tagged but no cluster key"):
        decode(tagged, key=None)
    with pytest.raises(fr.FrameAuthError, match="bad frame tag"):
        decode(tagged, key=b"another key")
    for index in (-fr.TAG_BYTES - 1, -1, 10):  # a payload byte, a tag byte, the request id
        flipped = bytearray(tagged)
        flipped[index] ^= 0x01
        with pytest.raises(fr.FrameAuthError, match="bad frame tag"):
            decode(flipped, key=KEY)


def test_errors_have_reasons_and_derive_from_armdi_error() -> None:
    from engines.errors import ArmdiError

    reasons = {cls.reason for cls in (fr.FrameError, fr.InvalidFrameError,
                                      fr.MalformedFrameError, fr.TruncatedFrameError,
                                      fr.OversizeFrameError, fr.FrameAuthError)}
    assert len(reasons) == 6
    assert issubclass(fr.FrameError, ArmdiError)


# ---------------------------------------------------------------------------- fuzz
@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=300), key=st.one_of(st.none(), st.just(KEY)))
def test_random_bytes_raise_only_frame_errors(data: bytes, key: bytes | None) -> None:
    with pytest.raises(fr.FrameError):
        decode(data, key=key)


@settings(max_examples=300, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1,
                      max_size=4),
       key=st.one_of(st.none(), st.just(KEY)))
def test_mutated_frames_decode_or_raise_frame_errors(edits: list[tuple[int, int]],
                                                     key: bytes | None) -> None:
    data = fr.encode_frame(make(np.arange(6, dtype=np.float32).reshape(2, 3)), key)
    for index, value in edits:
        data[index % len(data)] = value
    try:
        frame = decode(data, key=key)
    except fr.FrameError:
        return
    assert frame.tensor.nbytes <= len(data)  # an edit the format cannot see (payload, no key)


# ---------------------------------------------------------------------------- the C codec
def agree(data: bytes | bytearray, max_bytes: int = LIMIT) -> str:
    """The C decoder passes a frame only if the Python decoder accepts it, with the same
    fields; whatever the Python decoder refuses, the C decoder declines (None). Returns
    what happened: 'both', 'python' (C declined a good frame) or 'refused'."""
    assert fr._c_decode is not None
    fields = fr._c_decode(data, max_bytes)
    try:
        frame = fr._decode_frame_py(data, key=None, max_bytes=max_bytes)
    except fr.FrameAuthError:  # the last check: the rest is good, and the frame is tagged
        try:
            frame = fr._decode_frame_py(data, key=KEY, max_bytes=max_bytes)
        except fr.FrameAuthError:  # a tag that an edit broke
            frame = None
    except fr.FrameError:
        assert fields is None
        return "refused"
    if fields is None:
        return "python"
    (kind, request_id, attempt, fingerprint, start_block, dtype, shape, trace_wire, count, ext,
     payload_at, tagged) = fields
    if frame is None:  # tagged, the tag broken: the C decoder leaves tags to Python
        assert tagged
        return "both"
    assert (fr.FrameKind(kind), request_id, attempt, fingerprint, start_block, trace_wire,
            count, ext, "") == (frame.kind, frame.request_id, frame.attempt, frame.fingerprint,
                                frame.start_block, frame.trace_wire, frame._trace_count,
                                frame.ext, frame.error)
    assert fr._DTYPE_BY_CODE[dtype] == frame.tensor.dtype and shape == frame.tensor.shape
    start = np.frombuffer(data, np.uint8).ctypes.data
    assert frame.tensor.nbytes == 0 or frame.tensor.ctypes.data - start == payload_at
    return "both"


@needs_c_codec
@pytest.mark.parametrize("key", [None, KEY])
@pytest.mark.parametrize("dtype", DTYPES)
def test_c_codec_passes_good_frames_as_python_does(dtype: str, key: bytes | None) -> None:
    tensor = (np.arange(2 * 3 * 5) % 200).astype(dtype).reshape(2, 3, 5)
    for kind in (fr.FrameKind.ACTIVATION, fr.FrameKind.RESULT, fr.FrameKind.HEARTBEAT):
        frame = make(tensor, kind=kind, ext=b"\x01\x02\x03")
        assert agree(fr.encode_frame(frame, key)) == "both"
    for shape in [(), (0,), (1, 0, 3), (1,) * fr.MAX_NDIM]:
        assert agree(fr.encode_frame(make(np.zeros(shape, np.float32), trace=()), key)) == "both"


@needs_c_codec
def test_c_codec_leaves_error_frames_and_non_ascii_names_to_python() -> None:
    error = make(kind=fr.FrameKind.ERROR, error="engine failed")
    assert agree(fr.encode_frame(error, None)) == "python"
    named = make(trace=(fr.TraceEntry(node="wörker", start=0, end=1, ms=0.5),))
    assert agree(fr.encode_frame(named, None)) == "python"
    assert_same(fr.decode_frame(fr.encode_frame(named, None), key=None, max_bytes=LIMIT), named)


@needs_c_codec
def test_c_codec_declines_every_truncation_and_oversize() -> None:
    data = fr.encode_frame(make(), KEY)
    decode = fr._c_decode
    assert decode is not None
    for end in range(len(data)):
        assert decode(data[:end], LIMIT) is None
    assert decode(data, len(data) - 1) is None
    assert decode(data, len(data)) is not None
    assert decode(np.zeros((4, 4), np.float32).data[::2], LIMIT) is None


@needs_c_codec
@settings(max_examples=600, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), min_size=1,
                      max_size=4),
       ndim=st.integers(0, 3), entries=st.integers(0, 3), ext=st.binary(max_size=9),
       key=st.one_of(st.none(), st.just(KEY)))
def test_c_and_python_decoders_agree_on_mutated_frames(
        edits: list[tuple[int, int]], ndim: int, entries: int, ext: bytes,
        key: bytes | None) -> None:
    trace = tuple(fr.TraceEntry(node=f"w{i}", start=i, end=i + 1, ms=0.5) for i in range(entries))
    data = fr.encode_frame(make(np.ones((2,) * ndim, np.float32), trace=trace, ext=ext), key)
    agree(data)
    for index, value in edits:
        data[index % len(data)] = value
    agree(data)


@needs_c_codec
@settings(max_examples=400, deadline=None)
@given(data=st.binary(min_size=0, max_size=200))
def test_c_and_python_decoders_agree_on_random_bytes_after_a_good_prefix(data: bytes) -> None:
    good = fr.encode_frame(make(), None)
    agree(bytes(good[:64]) + data)
    agree(bytes(good[: 64 + len(data) % 40]) + data)


@pytest.mark.parametrize("key", [None, KEY])
def test_python_decoder_alone_round_trips(monkeypatch: pytest.MonkeyPatch,
                                          key: bytes | None) -> None:
    """Where the C codec was not built, decode_frame is the Python decoder alone."""
    monkeypatch.setattr(fr, "_c_decode", None)
    for kind in fr.FrameKind:
        frame = make(kind=kind, error="failed" if kind == fr.FrameKind.ERROR else "", ext=b"x")
        assert_same(fr.decode_frame(fr.encode_frame(frame, key), key=key, max_bytes=LIMIT), frame)
    with pytest.raises(fr.TruncatedFrameError):
        fr.decode_frame(fr.encode_frame(make(), key)[:-1], key=key, max_bytes=LIMIT)


def test_the_layout_caches_stay_bounded_under_a_flood_of_layouts() -> None:
    """Each frame layout (ndim, trace, error, extension sizes) gets a cached struct; a sender
    varying its extension length without end does not grow them without end."""
    for n in range(fr._LAYOUT_CACHE + 100):
        frame = make(ext=bytes(n % 4000), trace=())
        data = fr.encode_frame(frame, None)
        fr._decode_frame_py(data, key=None, max_bytes=LIMIT)
    assert 0 < len(fr._HEADS) <= fr._LAYOUT_CACHE
    assert 0 < len(fr._TAILS) <= fr._LAYOUT_CACHE
