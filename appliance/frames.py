"""Activation frames: the self-describing unit of data that flows along the chain.

A frame says where it is (``start_block``, the first block not yet computed), whose it is
(request id, attempt, model fingerprint) and how it got there (the trace), so boundaries can
move while frames are in flight. On the wire (all integers little-endian)::

    offset  size  field
    0       4     magic b"ARMD"
    4       1     format version (1)
    5       1     kind            1 ACTIVATION, 2 RESULT, 3 ERROR
    6       2     flags           bit 0: an HMAC tag follows the payload
    8       8     request id
    16      2     attempt
    18      32    model fingerprint (raw sha256; the manifest stores it as hex)
    50      2     start block
    52      1     dtype code      1 float32, 2 float16, 3 uint8, 4 int64
    53      1     ndim            <= 8
    54      4*n   shape, u32 each
    ..      1     trace entries   <= 64, each: name length u8, name utf-8 (<= 64 bytes),
                                  start u16, end u16, milliseconds float32
    ..      2     error length    then the utf-8 error message (ERROR frames only)
    ..      0-7   zero padding    so the payload starts 8-byte aligned within the frame
    ..      8     payload length  must equal prod(shape) * itemsize
    ..      n     payload         C order, little-endian
    ..      32    HMAC-SHA256 over every byte before it, when flag bit 0 is set

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
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from engines.errors import ArmdiError

MAGIC: Final = b"ARMD"
FORMAT_VERSION: Final = 1
FLAG_TAGGED: Final = 0x0001
KNOWN_FLAGS: Final = FLAG_TAGGED

MAX_NDIM: Final = 8
MAX_TRACE: Final = 64
MAX_NODE_NAME_BYTES: Final = 64
MAX_ERROR_BYTES: Final = 4096
TAG_BYTES: Final = 32
FINGERPRINT_BYTES: Final = 32
PAYLOAD_ALIGN: Final = 8

_U16_MAX: Final = 0xFFFF
_U32_MAX: Final = 0xFFFF_FFFF
_U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF

_FIXED = struct.Struct("<4sBBHQH32sHBB")  # magic .. ndim
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
_TRACE_TAIL = struct.Struct("<HHf")  # start, end, ms

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
_SHAPES: Final = tuple(struct.Struct(f"<{n}I") for n in range(MAX_NDIM + 1))


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


@dataclass(frozen=True, eq=False)
class Frame:
    """One frame. ``tensor`` is the payload; a decoded frame's tensor is a view of the
    received buffer (read it, copy it if it must outlive the frame's use).

    Compared by identity (``eq=False``): a numpy field has no single truth value.
    """

    kind: FrameKind
    request_id: int
    attempt: int
    fingerprint: bytes
    start_block: int
    tensor: Tensor
    trace: tuple[TraceEntry, ...] = ()
    error: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.kind, FrameKind):
            raise InvalidFrameError(f"kind must be a FrameKind, got {self.kind!r}")
        _check_range("request_id", self.request_id, _U64_MAX)
        _check_range("attempt", self.attempt, _U16_MAX)
        _check_range("start_block", self.start_block, _U16_MAX)
        if not isinstance(self.fingerprint, bytes) or len(self.fingerprint) != FINGERPRINT_BYTES:
            raise InvalidFrameError(
                f"fingerprint must be {FINGERPRINT_BYTES} raw bytes (use "
                f"fingerprint_from_hex for the manifest's hex form), got {self.fingerprint!r:.80}")
        if not isinstance(self.tensor, np.ndarray):
            raise InvalidFrameError(f"tensor must be a numpy array, got {type(self.tensor)}")
        if _dtype_code(self.tensor.dtype) is None:
            raise InvalidFrameError(
                f"tensor dtype {self.tensor.dtype} is not one of {sorted(_CODE_BY_NAME)}")
        if self.tensor.ndim > MAX_NDIM:
            raise InvalidFrameError(f"tensor has {self.tensor.ndim} dims, at most {MAX_NDIM}")
        if self.tensor.ndim and max(self.tensor.shape) > _U32_MAX:
            raise InvalidFrameError(f"tensor shape {self.tensor.shape} has a dim over 2**32-1")
        if len(self.trace) > MAX_TRACE:
            raise InvalidFrameError(f"trace has {len(self.trace)} entries, at most {MAX_TRACE}")
        if self.error and self.kind != FrameKind.ERROR:
            raise InvalidFrameError(f"an error message is only allowed on ERROR frames, "
                                    f"not {self.kind.name}")
        if self.error and len(self.error.encode("utf-8", errors="replace")) > MAX_ERROR_BYTES:
            raise InvalidFrameError(f"error message is over {MAX_ERROR_BYTES} utf-8 bytes")


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
def encode_frame(frame: Frame, key: bytes | None) -> bytearray:
    """Serialise ``frame``, tagged with HMAC-SHA256 under ``key`` when one is given.

    The payload is copied exactly once, straight from the tensor into the final buffer
    (any strides and byte order are converted by that same copy).
    """
    size, write = frame_writer(frame, key)
    out = bytearray(size)
    write(memoryview(out))
    return out


def frame_writer(frame: Frame, key: bytes | None) -> tuple[int, Callable[[memoryview], None]]:
    """``(size, write)``: the encoded size of ``frame``, and a function that encodes it into
    a writable buffer of exactly that size (``encode_frame``'s bytes, byte for byte).

    For senders that own the destination, e.g. an NNG message (``DataOutbox.send_with``):
    the payload goes straight from the tensor into the message, with no buffer in between.
    """
    tensor = frame.tensor
    code = _dtype_code(tensor.dtype)
    assert code is not None  # Frame.__post_init__ refused the others
    head = _encode_head(frame, code, tagged=key is not None)
    payload_len = tensor.nbytes
    start = len(head)
    total = start + payload_len + (TAG_BYTES if key is not None else 0)

    def write(out: memoryview) -> None:
        if len(out) != total:
            raise InvalidFrameError(f"frame buffer of {len(out)} bytes, the frame is {total}")
        out[:start] = head
        if payload_len:
            wire = _DTYPE_BY_CODE[code]
            if tensor.ndim and tensor.dtype == wire and tensor.flags.c_contiguous:
                out[start : start + payload_len] = tensor.data.cast("B")  # one memcpy
            else:  # strides or byte order to convert: numpy does it in the same single copy
                dst = np.frombuffer(out, dtype=wire, count=tensor.size, offset=start)
                np.copyto(dst.reshape(tensor.shape), tensor, casting="equiv")
                del dst  # release the export of ``out`` before handing it over
        if key is not None:
            body_end = total - TAG_BYTES
            out[body_end:] = hmac.digest(key, out[:body_end], hashlib.sha256)

    return total, write


def _encode_head(frame: Frame, code: int, *, tagged: bool) -> bytes:
    tensor = frame.tensor
    parts = [
        _FIXED.pack(MAGIC, FORMAT_VERSION, int(frame.kind), FLAG_TAGGED if tagged else 0,
                    int(frame.request_id), int(frame.attempt), frame.fingerprint,
                    int(frame.start_block), code, tensor.ndim),
        _SHAPES[tensor.ndim].pack(*tensor.shape),
        _U8.pack(len(frame.trace)),
    ]
    for hop in frame.trace:
        name = hop.node.encode("utf-8", errors="replace")
        parts += [_U8.pack(len(name)), name, _TRACE_TAIL.pack(hop.start, hop.end, hop.ms)]
    error = frame.error.encode("utf-8", errors="replace") if frame.error else b""
    parts += [_U16.pack(len(error)), error]
    head = b"".join(parts)
    return head + bytes(_padding(len(head))) + _U64.pack(tensor.nbytes)


def _padding(offset: int) -> int:
    """Zero bytes after ``offset`` so the payload (after the u64 length) starts aligned."""
    return -(offset + _U64.size) % PAYLOAD_ALIGN


# ---------------------------------------------------------------------------- decode
class _Reader:
    """Bounds-checked little-endian reads; running off the end is a TruncatedFrameError."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.size = len(view)
        self.pos = 0

    def _advance(self, size: int, what: str) -> int:
        start, end = self.pos, self.pos + size
        if end > self.size:
            raise TruncatedFrameError(
                f"truncated frame: {what} needs bytes {start}..{end}, "
                f"the frame has {self.size}")
        self.pos = end
        return start

    def take(self, size: int, what: str) -> memoryview:
        start = self._advance(size, what)
        return self.view[start : self.pos]

    def unpack(self, fmt: struct.Struct, what: str) -> tuple[Any, ...]:
        return fmt.unpack_from(self.view, self._advance(fmt.size, what))


def decode_frame(buf: bytes | bytearray | memoryview, *, key: bytes | None,
                 max_bytes: int) -> Frame:
    """Parse and check one frame. The tensor is a zero-copy view of ``buf``.

    With ``key`` every frame must carry a valid tag; without one a tagged frame is refused
    too (a cluster half-configured with a key is a mistake worth hearing about).
    """
    view = memoryview(buf)
    if not view.c_contiguous:
        raise InvalidFrameError("decode_frame needs a contiguous buffer")
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    if len(view) > max_bytes:
        raise OversizeFrameError(f"frame of {len(view)} bytes is over the {max_bytes} limit")
    reader = _Reader(view)
    (magic, version, kind_code, flags, request_id, attempt, fingerprint, start_block,
     dtype_code, ndim) = reader.unpack(_FIXED, "the fixed header")
    if magic != MAGIC:
        raise MalformedFrameError(f"bad magic {bytes(magic)!r}: not an armdi frame")
    if version != FORMAT_VERSION:
        raise MalformedFrameError(
            f"unsupported frame format version {version} (this node speaks {FORMAT_VERSION})")
    try:
        kind = FrameKind(kind_code)
    except ValueError:
        raise MalformedFrameError(f"unknown frame kind {kind_code}") from None
    if flags & ~KNOWN_FLAGS:
        raise MalformedFrameError(f"unknown flags {flags:#06x}")
    dtype = _DTYPE_BY_CODE.get(dtype_code)
    if dtype is None:
        raise MalformedFrameError(f"unknown dtype code {dtype_code}")
    if ndim > MAX_NDIM:
        raise MalformedFrameError(f"frame declares {ndim} dims, at most {MAX_NDIM}")
    shape = reader.unpack(_SHAPES[ndim], "the shape")
    trace = _read_trace(reader)
    (error_len,) = reader.unpack(_U16, "the error length")
    if error_len > MAX_ERROR_BYTES:
        raise MalformedFrameError(f"error message of {error_len} bytes, at most {MAX_ERROR_BYTES}")
    error = _utf8(reader.take(error_len, "the error message"), "error message") \
        if error_len else ""
    padding = _padding(reader.pos)
    if padding and any(reader.take(padding, "the padding")):
        raise MalformedFrameError("non-zero padding before the payload")
    (payload_len,) = reader.unpack(_U64, "the payload length")

    tagged = bool(flags & FLAG_TAGGED)
    payload_start = reader.pos
    declared = payload_start + payload_len + (TAG_BYTES if tagged else 0)
    if declared > max_bytes:
        raise OversizeFrameError(f"frame declares {declared} bytes, over the {max_bytes} limit")
    if declared > len(view):
        raise TruncatedFrameError(
            f"truncated frame: it declares {declared} bytes ({payload_len} of payload), "
            f"only {len(view)} arrived")
    if declared < len(view):
        raise MalformedFrameError(f"{len(view) - declared} unexpected bytes after the frame")
    expected = dtype.itemsize * _product(shape)
    if payload_len != expected:
        raise MalformedFrameError(
            f"payload of {payload_len} bytes does not match shape {shape} of {dtype.name} "
            f"({expected} bytes)")
    _check_tag(view, tagged=tagged, key=key)

    payload = view[payload_start : payload_start + payload_len]
    tensor = np.frombuffer(payload, dtype=dtype).reshape(shape)
    try:
        return Frame(kind=kind, request_id=request_id, attempt=attempt,
                     fingerprint=bytes(fingerprint), start_block=start_block, tensor=tensor,
                     trace=trace, error=error)
    except InvalidFrameError as err:
        raise MalformedFrameError(f"frame fields are invalid: {err}") from err


def _read_trace(reader: _Reader) -> tuple[TraceEntry, ...]:
    (count,) = reader.unpack(_U8, "the trace length")
    if count > MAX_TRACE:
        raise MalformedFrameError(f"frame declares {count} trace entries, at most {MAX_TRACE}")
    trace = []
    for index in range(count):
        (name_len,) = reader.unpack(_U8, f"trace entry {index}")
        if not 0 < name_len <= MAX_NODE_NAME_BYTES:
            raise MalformedFrameError(
                f"trace entry {index} has a {name_len}-byte node name "
                f"(1..{MAX_NODE_NAME_BYTES} allowed)")
        name = _utf8(reader.take(name_len, f"trace entry {index}"), f"trace entry {index} name")
        start, end, ms = reader.unpack(_TRACE_TAIL, f"trace entry {index}")
        if start > end:
            raise MalformedFrameError(f"trace entry {index} has blocks [{start}, {end})")
        trace.append(TraceEntry(node=name, start=start, end=end, ms=ms))
    return tuple(trace)


def _utf8(raw: memoryview, what: str) -> str:
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError as err:
        raise MalformedFrameError(f"{what} is not utf-8") from err


def _product(shape: tuple[int, ...]) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


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
