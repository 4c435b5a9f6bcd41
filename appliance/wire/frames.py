"""Activation frames: the self-describing unit of data that flows along the chain.

A frame says where it is (``start_block``, the first block not yet computed), whose it is
(request id, attempt, model fingerprint) and how it got there (the trace), so boundaries can
move while frames are in flight. On the wire (all integers little-endian)::

    offset  size  field
    0       4     magic b"ARMD"
    4       1     format version (2)
    5       1     kind            1 ACTIVATION, 2 RESULT, 3 ERROR, 4 HEARTBEAT
    6       2     flags           bit 0: an HMAC tag follows the payload
    8       8     request id
    16      2     attempt
    18      2     start block
    20      1     dtype code      1 float32, 2 float16, 3 uint8, 4 int64
    21      1     ndim            <= 8
    22      2     trace bytes     length of the trace section
    24      2     error bytes     length of the error message (ERROR frames only)
    26      2     extension bytes length of the extension section
    28      4     reserved        zero
    32      32    model fingerprint (raw sha256; the manifest stores it as hex)
    64      4*n   shape, u32 each
    ..            trace section   <= 64 entries, each: name length u8, name utf-8 (<= 64 bytes),
                                  start u16, end u16, milliseconds float32
    ..            error message   utf-8
    ..            extension       opaque bytes carried hop to hop (fields later versions add)
    ..      0-7   zero padding    so the payload starts 8-byte aligned within the frame
    ..      8     payload length  must equal prod(shape) * itemsize
    ..      n     payload         C order, little-endian
    ..      32    HMAC-SHA256 over every byte before it, when flag bit 0 is set

Everything of fixed size sits in one 64-byte header read by a single precompiled ``struct``;
the variable parts are length-prefixed, so a worker forwards the trace as the bytes it
received plus its own entry, without parsing it (the source parses it once, at the end).

Errors::

    FrameError (ArmdiError)         any frame the decoder will not accept, or a bad Frame value
    ├── InvalidFrameError           a Frame built with an out-of-range field (sender bug)
    ├── MalformedFrameError         bad magic, version, kind, dtype, sizes, shape, padding
    │   └── TruncatedFrameError     fewer bytes than the header or the payload length declares
    ├── OversizeFrameError          the frame is, or declares itself, larger than max_bytes
    └── FrameAuthError              tag missing, wrong, or present with no cluster key

Each class carries ``reason``, a short label for drop counters.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import importlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from math import prod
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn

import numpy as np
import numpy.typing as npt

from engines.errors import ArmdiError


def _load_native() -> Any:
    """The hop in C (``_codec.c``), or None: optional, built where a C compiler was at
    install. transport.py takes its receive and send from here too."""
    try:
        return importlib.import_module("appliance.wire._codec")
    except ImportError:  # pragma: no cover - depends on the install
        return None


native: Final = _load_native()
_c_decode: Final = None if native is None else native.decode

CODEC: Final = "python" if native is None else "c"
"""Which code checks good frames (and, in transport.py, receives and sends them): ``"c"``
(``_codec.c``) or ``"python"``."""

MAGIC: Final = b"ARMD"
FORMAT_VERSION: Final = 2
FLAG_TAGGED: Final = 0x0001
KNOWN_FLAGS: Final = FLAG_TAGGED

MAX_NDIM: Final = 8
MAX_TRACE: Final = 64
MAX_NODE_NAME_BYTES: Final = 64
MAX_ERROR_BYTES: Final = 4096
MAX_EXT_BYTES: Final = 4096
TAG_BYTES: Final = 32
FINGERPRINT_BYTES: Final = 32
PAYLOAD_ALIGN: Final = 8
HEADER_BYTES: Final = 64

_U16_MAX: Final = 0xFFFF
_U32_MAX: Final = 0xFFFF_FFFF
_U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF

# magic, version, kind, flags, request id, attempt, start block, dtype, ndim, trace bytes,
# error bytes, extension bytes, reserved, fingerprint
_FIXED: Final = struct.Struct("<4sBBHQHHBBHHHI32s")
assert _FIXED.size == HEADER_BYTES
_TRACE_TAIL: Final = struct.Struct("<HHf")  # start, end, ms

WireDtype = Literal["float32", "float16"]
Tensor = npt.NDArray[Any]


# ---------------------------------------------------------------------------- errors
class FrameError(ArmdiError):
    """A frame that cannot be built or will not be accepted."""

    reason = "bad_frame"


class InvalidFrameError(FrameError):
    reason = "invalid_frame"


class MalformedFrameError(FrameError):
    reason = "malformed_frame"


class TruncatedFrameError(MalformedFrameError):
    reason = "truncated_frame"


class OversizeFrameError(FrameError):
    reason = "oversize_frame"


class FrameAuthError(FrameError):
    reason = "bad_tag"


# ---------------------------------------------------------------------------- values
class FrameKind(enum.IntEnum):
    ACTIVATION = 1  # an intermediate activation, to be run from start_block on
    RESULT = 2  # the model output, on its way back to the source
    ERROR = 3  # a worker could not process the request; ``error`` says why
    HEARTBEAT = 4  # a worker is alive (no request; its trace names the worker)


_KINDS: Final[dict[int, FrameKind]] = {int(k): k for k in FrameKind}
_DTYPE_BY_CODE: Final[dict[int, np.dtype[Any]]] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f2"),
    3: np.dtype("u1"),
    4: np.dtype("<i8"),
}
_CODE_BY_NAME: Final[dict[str, int]] = {dt.name: code for code, dt in _DTYPE_BY_CODE.items()}
# Looked up by dtype first: ``dtype.name`` is a slow Python-level property in numpy, and these
# lookups sit on every hop's path. Other byte orders fall back to the name.
_CODE_BY_DTYPE: Final[dict[np.dtype[Any], int]] = {
    dt: code for code, dt in _DTYPE_BY_CODE.items()}

# The whole head of a frame of one layout (ndim, trace, error and extension bytes) in one
# precompiled struct: the fixed header, the shape, the three variable parts, the padding and
# the payload length. Encoding is then one ``pack`` and decoding, past the fixed header, one
# ``unpack_from``; a chain's frames share a handful of layouts, so the cache stays small (it
# is emptied if a flood of odd layouts fills it).
_HEADS: dict[tuple[int, int, int, int], struct.Struct] = {}
_TAILS: dict[tuple[int, int, int, int], struct.Struct] = {}
_LAYOUT_CACHE: Final = 1024


def _padding(variable_end: int) -> int:
    """Zero bytes after the variable parts, so the payload (after its u64 length) starts
    ``PAYLOAD_ALIGN``-aligned."""
    return -(variable_end + 8) % PAYLOAD_ALIGN


def _layout_struct(layout: tuple[int, int, int, int], *, head: bool) -> struct.Struct:
    """The struct of a frame's head in one layout (ndim, trace, error and extension bytes):
    with ``head``, ``_FIXED`` + shape + trace + error + ext + zero padding + payload length,
    for encoding; without, what follows ``_FIXED``, the padding read as bytes (so it can be
    checked to be zero), for decoding."""
    ndim, trace_len, error_len, ext_len = layout
    pad = _padding(HEADER_BYTES + 4 * ndim + trace_len + error_len + ext_len)
    cache = _HEADS if head else _TAILS
    if len(cache) >= _LAYOUT_CACHE:
        cache.clear()
    parts = f"{ndim}I{trace_len}s{error_len}s{ext_len}s"
    made = cache[layout] = struct.Struct(
        f"{_FIXED.format}{parts}{pad}xQ" if head else f"<{parts}{pad}sQ")
    return made


def _dtype_code(dtype: np.dtype[Any]) -> int | None:
    """The wire code of ``dtype`` (either byte order), None when it has none."""
    code = _CODE_BY_DTYPE.get(dtype)
    return code if code is not None else _CODE_BY_NAME.get(dtype.name)


@dataclass(frozen=True)
class TraceEntry:
    """One hop of a frame's path: ``node`` ran blocks ``[start, end)`` in ``ms``."""

    node: str
    start: int
    end: int
    ms: float

    def __post_init__(self) -> None:
        name = self.node.encode("utf-8", errors="replace")
        if not name or len(name) > MAX_NODE_NAME_BYTES:
            raise InvalidFrameError(
                f"trace node name must be 1..{MAX_NODE_NAME_BYTES} utf-8 bytes, "
                f"got {len(name)} ({self.node[:80]!r})")
        if not 0 <= self.start <= self.end <= _U16_MAX:
            raise InvalidFrameError(
                f"trace blocks [{self.start}, {self.end}) of {self.node!r} are not a range "
                f"within 0..{_U16_MAX}")

    def wire(self) -> bytes:
        """This entry as the trace section holds it."""
        return hop_wire(node_prefix(self.node), self.start, self.end, self.ms)


def node_prefix(node: str) -> bytes:
    """A node name as a trace entry starts: length byte, utf-8 bytes (compute it once)."""
    name = node.encode("utf-8", errors="replace")
    if not name or len(name) > MAX_NODE_NAME_BYTES:
        raise InvalidFrameError(f"trace node name must be 1..{MAX_NODE_NAME_BYTES} utf-8 "
                                f"bytes, got {len(name)} ({node[:80]!r})")
    return bytes((len(name),)) + name


def hop_wire(prefix: bytes, start: int, end: int, ms: float) -> bytes:
    """One trace entry on the wire, from ``node_prefix``; ``[start, end)`` must be a range."""
    if not 0 <= start <= end <= _U16_MAX:
        raise InvalidFrameError(f"trace blocks [{start}, {end}) are not a range within "
                                f"0..{_U16_MAX}")
    return prefix + _TRACE_TAIL.pack(start, end, ms)


_FIELDS: Final = ("kind", "request_id", "attempt", "fingerprint", "start_block", "tensor",
                  "error", "ext", "trace_wire", "_trace_count")


class Frame(tuple):  # type: ignore[type-arg]
    """One frame. ``tensor`` is the payload; a decoded frame's tensor is a view of the
    received buffer (read it, copy it if it must outlive the frame's use).

    Immutable. Built by the constructor, every field is checked (a sender's bug is an
    ``InvalidFrameError``); ``decode_frame`` and ``forward`` build frames from checked parts
    without checking again. The trace travels as bytes (``trace_wire``); ``trace`` parses
    them when someone reads it (the source, once per result).

    A tuple underneath (its fields by position, read through C-level properties): making one
    is a single call, which matters on a path that makes two per hop. It compares and hashes
    by identity, as a plain object would.
    """

    __slots__ = ()
    if TYPE_CHECKING:
        kind: FrameKind
        request_id: int
        attempt: int
        fingerprint: bytes
        start_block: int
        tensor: Tensor
        error: str
        ext: bytes
        trace_wire: bytes
        _trace_count: int
    else:
        kind = property(itemgetter(0), doc="the frame's kind")
        request_id = property(itemgetter(1), doc="the source's id of the request")
        attempt = property(itemgetter(2), doc="which attempt at the request (1, 2, ...)")
        fingerprint = property(itemgetter(3), doc="the model's fingerprint, raw sha256")
        start_block = property(itemgetter(4), doc="the first block not yet computed")
        tensor = property(itemgetter(5), doc="the payload")
        error = property(itemgetter(6), doc="why a worker failed (ERROR frames)")
        ext = property(itemgetter(7), doc="the extension section, carried hop to hop")
        trace_wire = property(itemgetter(8), doc="the trace section as it travels")
        _trace_count = property(itemgetter(9))

    def __new__(cls, kind: FrameKind, request_id: int, attempt: int, fingerprint: bytes,
                start_block: int, tensor: Tensor, trace: Iterable[TraceEntry] = (),
                error: str = "", ext: bytes = b"") -> Frame:
        if not isinstance(kind, FrameKind):
            raise InvalidFrameError(f"kind must be a FrameKind, got {kind!r}")
        _check_range("request_id", request_id, _U64_MAX)
        _check_range("attempt", attempt, _U16_MAX)
        _check_range("start_block", start_block, _U16_MAX)
        if not isinstance(fingerprint, bytes) or len(fingerprint) != FINGERPRINT_BYTES:
            raise InvalidFrameError(
                f"fingerprint must be {FINGERPRINT_BYTES} raw bytes (use "
                f"fingerprint_from_hex for the manifest's hex form), got {fingerprint!r:.80}")
        if not isinstance(tensor, np.ndarray):
            raise InvalidFrameError(f"tensor must be a numpy array, got {type(tensor)}")
        if _dtype_code(tensor.dtype) is None:
            raise InvalidFrameError(
                f"tensor dtype {tensor.dtype} is not one of {sorted(_CODE_BY_NAME)}")
        if tensor.ndim > MAX_NDIM:
            raise InvalidFrameError(f"tensor has {tensor.ndim} dims, at most {MAX_NDIM}")
        if tensor.ndim and max(tensor.shape) > _U32_MAX:
            raise InvalidFrameError(f"tensor shape {tensor.shape} has a dim over 2**32-1")
        entries = tuple(trace)
        if len(entries) > MAX_TRACE:
            raise InvalidFrameError(f"trace has {len(entries)} entries, at most {MAX_TRACE}")
        if not all(isinstance(e, TraceEntry) for e in entries):
            raise InvalidFrameError("trace entries must be TraceEntry values")
        if error and kind != FrameKind.ERROR:
            raise InvalidFrameError(f"an error message is only allowed on ERROR frames, "
                                    f"not {kind.name}")
        if error and len(error.encode("utf-8", errors="replace")) > MAX_ERROR_BYTES:
            raise InvalidFrameError(f"error message is over {MAX_ERROR_BYTES} utf-8 bytes")
        if not isinstance(ext, bytes) or len(ext) > MAX_EXT_BYTES:
            raise InvalidFrameError(f"ext must be bytes, at most {MAX_EXT_BYTES}")
        return _new(cls, (kind, int(request_id), int(attempt), fingerprint, int(start_block),
                          tensor, error, ext, b"".join(e.wire() for e in entries), len(entries)))

    __eq__ = object.__eq__  # identity, as for any object: tuple's would compare tensors
    __ne__ = object.__ne__
    __hash__ = object.__hash__

    # -- reading
    @property
    def trace(self) -> tuple[TraceEntry, ...]:
        """The hops so far, parsed from the wire (``MalformedFrameError`` if the trace
        section of a received frame does not parse)."""
        return _parse_trace(self[8])

    # -- new frames from this one
    def replace(self, **changes: Any) -> Frame:
        """A copy with ``changes`` (checked, as the constructor checks)."""
        fields: dict[str, Any] = {
            "kind": self.kind, "request_id": self.request_id, "attempt": self.attempt,
            "fingerprint": self.fingerprint, "start_block": self.start_block,
            "tensor": self.tensor, "trace": self.trace, "error": self.error, "ext": self.ext}
        fields.update(changes)
        return Frame(**fields)

    def forward(self, kind: FrameKind, start_block: int, tensor: Tensor, hop: bytes,
                error: str = "") -> Frame:
        """The frame a node sends on after running this one: same request, ``hop`` (from
        ``hop_wire``) appended to the trace, the extension carried over unchanged.

        The hot path of every hop: nothing already checked is checked again. ``tensor``
        must have a wire dtype (an engine's float32 output does)."""
        count = self[9]
        if count >= MAX_TRACE:
            raise InvalidFrameError(f"trace has {MAX_TRACE} entries already")
        if error:
            if kind != FrameKind.ERROR:
                raise InvalidFrameError("an error message is only allowed on ERROR frames")
            error = error.encode("utf-8", errors="replace")[:MAX_ERROR_BYTES].decode(
                "utf-8", errors="ignore")
        if tensor.ndim > MAX_NDIM or (tensor.dtype not in _CODE_BY_DTYPE
                                      and _dtype_code(tensor.dtype) is None):
            raise InvalidFrameError(f"tensor {tensor.dtype}{tensor.shape} cannot travel")
        return _new(Frame, (kind, self[1], self[2], self[3], start_block, tensor, error, self[7],
                            self[8] + hop, count + 1))

    def with_ext(self, ext: bytes) -> Frame:
        """This frame with another extension section (a node updating a record in it)."""
        if len(ext) > MAX_EXT_BYTES:
            raise InvalidFrameError(f"ext must be bytes, at most {MAX_EXT_BYTES}")
        return _new(Frame, (*self[:7], ext, self[8], self[9]))

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"Frame is immutable (cannot set {name!r}); use replace()")

    def __repr__(self) -> str:
        return (f"Frame({self.kind.name}, request {self.request_id}, attempt {self.attempt}, "
                f"start_block {self.start_block}, {self.tensor.dtype}{list(self.tensor.shape)})")


_new: Final = tuple.__new__


def _check_range(name: str, value: int, upper: int) -> None:
    if not isinstance(value, (int, np.integer)) or not 0 <= value <= upper:
        raise InvalidFrameError(f"{name} must be an integer in 0..{upper}, got {value!r}")


def fingerprint_from_hex(text: str) -> bytes:
    """The raw 32-byte fingerprint of a manifest's hex sha256."""
    try:
        raw = bytes.fromhex(text)
    except ValueError as err:
        raise InvalidFrameError(f"fingerprint {text[:80]!r} is not hex") from err
    if len(raw) != FINGERPRINT_BYTES:
        raise InvalidFrameError(
            f"fingerprint {text[:80]!r} is {len(raw)} bytes, a sha256 is {FINGERPRINT_BYTES}")
    return raw


def cast_for_wire(array: Tensor, wire_dtype: WireDtype) -> Tensor:
    """``array`` as it should travel: float32 activations become float16 when the cluster
    ships float16 (half the bytes; values beyond +-65504 become inf). Other dtypes, and
    ``wire_dtype="float32"``, pass through uncopied."""
    if wire_dtype == "float16":
        if array.dtype == np.float32:
            return array.astype(np.float16)
        return array
    if wire_dtype == "float32":
        return array
    raise InvalidFrameError(f"wire dtype must be 'float32' or 'float16', got {wire_dtype!r}")


def to_compute_dtype(array: Tensor) -> Tensor:
    """The receiver's half of ``cast_for_wire``: float16 back to float32, others unchanged."""
    if array.dtype == np.float16:
        return array.astype(np.float32)
    return array


# ---------------------------------------------------------------------------- encode
FrameParts = tuple[bytes, "Tensor | None", bytes]


def frame_parts(frame: Frame, key: bytes | None) -> FrameParts:
    """``(head, payload, tag)``: a frame's bytes in three pieces, for
    ``DataOutbox.send_frame`` to copy into one NNG message, so the payload goes from the
    tensor into the message in that one copy. ``payload`` is the tensor itself when it is
    C-contiguous in the wire's byte order (None when it holds no bytes); ``tag`` is the
    HMAC-SHA256 over head and payload under ``key`` (empty without one).

    ``encode_frame`` joins the same three pieces.
    """
    tensor = frame[5]
    dtype = tensor.dtype
    code = _CODE_BY_DTYPE.get(dtype)
    if code is None:
        code = _dtype_code(dtype)
        assert code is not None  # the constructor and forward() refused the others
    trace = frame[8]
    error = frame[6].encode("utf-8", errors="replace") if frame[6] else b""
    ext = frame[7]
    ndim = tensor.ndim
    layout = (ndim, len(trace), len(error), len(ext))
    payload: Tensor | None = tensor
    if not (tensor.flags.c_contiguous and dtype is _DTYPE_BY_CODE[code]):
        # strides or byte order to convert (rare: engines give native C-order arrays)
        payload = np.ascontiguousarray(tensor, dtype=_DTYPE_BY_CODE[code])
    nbytes = tensor.nbytes
    head = (_HEADS.get(layout) or _layout_struct(layout, head=True)).pack(
        MAGIC, FORMAT_VERSION, frame[0], 0 if key is None else FLAG_TAGGED, frame[1],
        frame[2], frame[4], code, ndim, layout[1], layout[2], layout[3], 0, frame[3],
        *tensor.shape, trace, error, ext, nbytes)
    if not nbytes:
        payload = None
    if key is None:
        return head, payload, b""
    mac = hmac.new(key, head, hashlib.sha256)
    if payload is not None:
        mac.update(payload.data)
    return head, payload, mac.digest()


def encode_frame(frame: Frame, key: bytes | None) -> bytearray:
    """Serialise ``frame``, tagged with HMAC-SHA256 under ``key`` when one is given (the
    bytes ``DataOutbox.send_frame`` sends)."""
    head, payload, tag = frame_parts(frame, key)
    return bytearray().join((head, b"" if payload is None else payload.data, tag))


def _truncated(what: str, need: int, size: int) -> NoReturn:
    raise TruncatedFrameError(f"truncated frame: {what} needs bytes up to {need}, the frame "
                              f"has {size}")


def decode_frame(buf: bytes | bytearray | memoryview, *, key: bytes | None,
                 max_bytes: int) -> Frame:
    """Parse and check one frame. The tensor is a zero-copy view of ``buf``.

    With ``key`` every frame must carry a valid tag; without one a tagged frame is refused
    too (a cluster half-configured with a key is a mistake worth hearing about).

    Every hop runs this once. Where the C codec (``_codec.c``) was built, it checks a good
    frame in one call; anything it does not pass (a bad frame, an ERROR frame, a trace name
    that is not ASCII) goes to the Python decoder, which accepts the same frames and gives
    the exact error.
    """
    fields = None if _c_decode is None else _c_decode(buf, max_bytes)
    if fields is None:
        return _decode_frame_py(buf, key=key, max_bytes=max_bytes)
    (kind, request_id, attempt, fingerprint, start_block, dtype, shape, trace_wire, count, ext,
     payload_at, tagged) = fields
    if tagged or key is not None:
        _check_tag(memoryview(buf).cast("B"), tagged=tagged, key=key)
    return _new(Frame, (_KINDS[kind], request_id, attempt, fingerprint, start_block,
                        np.ndarray(shape, _DTYPE_BY_CODE[dtype], buf, payload_at), "", ext,
                        trace_wire, count))


def _decode_frame_py(buf: bytes | bytearray | memoryview, *, key: bytes | None,
                     max_bytes: int) -> Frame:
    """``decode_frame`` in Python alone: the checks of a good frame are few compound tests; a
    frame that fails one is looked at again by ``_header_error`` for the exact reason."""
    view = memoryview(buf)
    if view.ndim != 1 or view.itemsize != 1:
        if not view.c_contiguous:
            raise InvalidFrameError("decode_frame needs a contiguous buffer")
        view = view.cast("B")
    size = len(view)
    if size > max_bytes:
        raise OversizeFrameError(f"frame of {size} bytes is over the {max_bytes} limit")
    if size < HEADER_BYTES:
        if size >= 4 and bytes(view[:4]) != MAGIC:
            raise MalformedFrameError(f"bad magic {bytes(view[:4])!r}: not an armdi frame")
        _truncated("the fixed header", HEADER_BYTES, size)
    header = _FIXED.unpack_from(view)
    (magic, version, kind_code, flags, request_id, attempt, start_block, dtype_code, ndim,
     trace_len, error_len, ext_len, reserved, fingerprint) = header
    kind = _KINDS.get(kind_code)
    dtype = _DTYPE_BY_CODE.get(dtype_code)
    if (magic != MAGIC or version != FORMAT_VERSION or kind is None or dtype is None
            or flags & ~KNOWN_FLAGS or ndim > MAX_NDIM or reserved
            or error_len > MAX_ERROR_BYTES or ext_len > MAX_EXT_BYTES
            or (error_len and kind is not FrameKind.ERROR)):
        _header_error(header)
    assert kind is not None and dtype is not None
    variable_end = HEADER_BYTES + 4 * ndim + trace_len + error_len + ext_len
    payload_at = variable_end + _padding(variable_end) + 8
    if payload_at > size:
        _truncated("the header's variable parts", payload_at, size)
    layout = (ndim, trace_len, error_len, ext_len)
    tail = (_TAILS.get(layout) or _layout_struct(layout, head=False)).unpack_from(
        view, HEADER_BYTES)
    shape = tail[:ndim]
    trace_wire, error_raw, ext, padding, payload_len = tail[ndim:]
    count = _check_trace(trace_wire) if trace_len else 0
    error = _utf8(error_raw, "error message") if error_len else ""
    if any(padding):
        raise MalformedFrameError("non-zero padding before the payload")
    tagged = flags & FLAG_TAGGED
    declared = payload_at + payload_len + (TAG_BYTES if tagged else 0)
    if declared != size:
        _size_error(declared, size, payload_len, max_bytes)
    items = prod(shape)
    if payload_len != dtype.itemsize * items:
        raise MalformedFrameError(
            f"payload of {payload_len} bytes does not match shape {shape} of {dtype.name} "
            f"({dtype.itemsize * items} bytes)")
    if tagged or key is not None:
        _check_tag(view, tagged=bool(tagged), key=key)
    tensor: Tensor = np.ndarray(shape, dtype, view, payload_at)  # a view: no copy
    return _new(Frame, (kind, request_id, attempt, fingerprint, start_block, tensor, error, ext,
                        trace_wire, count))


def _header_error(header: tuple[Any, ...]) -> NoReturn:
    """The exact reason a fixed header failed ``decode_frame``'s compound check."""
    (magic, version, kind_code, flags, _request_id, _attempt, _start_block, dtype_code, ndim,
     _trace_len, error_len, ext_len, reserved, _fingerprint) = header
    if magic != MAGIC:
        raise MalformedFrameError(f"bad magic {magic!r}: not an armdi frame")
    if version != FORMAT_VERSION:
        raise MalformedFrameError(
            f"unsupported frame format version {version} (this node speaks {FORMAT_VERSION})")
    kind = _KINDS.get(kind_code)
    if kind is None:
        raise MalformedFrameError(f"unknown frame kind {kind_code}")
    if flags & ~KNOWN_FLAGS:
        raise MalformedFrameError(f"unknown flags {flags:#06x}")
    if dtype_code not in _DTYPE_BY_CODE:
        raise MalformedFrameError(f"unknown dtype code {dtype_code}")
    if ndim > MAX_NDIM:
        raise MalformedFrameError(f"frame declares {ndim} dims, at most {MAX_NDIM}")
    if reserved:
        raise MalformedFrameError(f"reserved header field is {reserved:#x}, not 0")
    if error_len > MAX_ERROR_BYTES:
        raise MalformedFrameError(f"error message of {error_len} bytes, at most {MAX_ERROR_BYTES}")
    if error_len:
        raise MalformedFrameError("frame fields are invalid: an error message is only allowed "
                                  f"on ERROR frames, not {kind.name}")
    raise MalformedFrameError(f"extension of {ext_len} bytes, at most {MAX_EXT_BYTES}")


def _size_error(declared: int, size: int, payload_len: int, max_bytes: int) -> NoReturn:
    if declared > max_bytes:
        raise OversizeFrameError(f"frame declares {declared} bytes, over the {max_bytes} limit")
    if declared > size:
        raise TruncatedFrameError(
            f"truncated frame: it declares {declared} bytes ({payload_len} of payload), "
            f"only {size} arrived")
    raise MalformedFrameError(f"{size - declared} unexpected bytes after the frame")


def _check_trace(wire: bytes) -> int:
    """Walk a trace section without building it: its entries' count, or MalformedFrameError.
    Names must be utf-8 and ranges ranges, so ``Frame.trace`` cannot fail later."""
    pos, count, size = 0, 0, len(wire)
    names = _GOOD_NAMES
    unpack = _TRACE_TAIL.unpack_from
    while pos < size:
        name_len = wire[pos]
        tail = pos + 1 + name_len
        if count == MAX_TRACE or not 0 < name_len <= MAX_NODE_NAME_BYTES or tail + 8 > size:
            _trace_error(count, name_len)
        name = wire[pos + 1 : tail]
        if name not in names:
            try:
                name.decode("utf-8")
            except UnicodeDecodeError as err:
                raise MalformedFrameError(f"trace entry {count} name is not utf-8") from err
            if len(names) < 1024:  # the cluster's node names; a flood of others is not kept
                names.add(name)
        start, end, _ms = unpack(wire, tail)
        if start > end:
            raise MalformedFrameError(f"trace entry {count} has blocks [{start}, {end})")
        pos = tail + 8
        count += 1
    return count


_GOOD_NAMES: Final[set[bytes]] = set()  # node names already seen to be utf-8


def _trace_error(count: int, name_len: int) -> NoReturn:
    if count == MAX_TRACE:
        raise MalformedFrameError(f"frame declares over {MAX_TRACE} trace entries, at most "
                                  f"{MAX_TRACE}")
    if not 0 < name_len <= MAX_NODE_NAME_BYTES:
        raise MalformedFrameError(
            f"trace entry {count} has a {name_len}-byte node name "
            f"(1..{MAX_NODE_NAME_BYTES} allowed)")
    raise MalformedFrameError(f"trace entry {count} runs past the trace section")


def _parse_trace(wire: bytes) -> tuple[TraceEntry, ...]:
    _check_trace(wire)
    entries = []
    pos = 0
    while pos < len(wire):
        tail = pos + 1 + wire[pos]
        start, end, ms = _TRACE_TAIL.unpack_from(wire, tail)
        entries.append(TraceEntry(wire[pos + 1 : tail].decode("utf-8"), start, end, ms))
        pos = tail + _TRACE_TAIL.size
    return tuple(entries)


def _utf8(raw: bytes, what: str) -> str:
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError as err:
        raise MalformedFrameError(f"{what} is not utf-8") from err


def _check_tag(view: memoryview, *, tagged: bool, key: bytes | None) -> None:
    if key is None:
        if tagged:
            raise FrameAuthError("frame is tagged but no cluster key is configured")
        return
    if not tagged:
        raise FrameAuthError("frame has no tag but a cluster key is configured")
    body_end = len(view) - TAG_BYTES
    expected = hmac.digest(key, view[:body_end], hashlib.sha256)
    if not hmac.compare_digest(expected, view[body_end:]):
        raise FrameAuthError("bad frame tag: wrong cluster key, or the frame was altered")
