"""Control messages: typed, versioned, JSON on the wire, optionally tagged with HMAC-SHA256.

Every message is a frozen pydantic model with a ``type`` discriminator and a version ``v``.
On the wire a message travels in a small envelope::

    b"ARMC" | envelope version u8 (1) | flags u8 (bit 0: tagged) | JSON body | [32-byte tag]

The tag is HMAC-SHA256 under the cluster key (the same key as frames) over every byte before
it. Anything the decoder will not accept raises ``MessageError`` with a readable reason.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from appliance.wire.frames import WireDtype
from engines.errors import ArmdiError

MAGIC: Final = b"ARMC"
ENVELOPE_VERSION: Final = 1
FLAG_TAGGED: Final = 0x01
TAG_BYTES: Final = 32
MESSAGE_VERSION: Final = 1
DEFAULT_MAX_MESSAGE_BYTES: Final = 1 << 20
_HEAD_BYTES: Final = len(MAGIC) + 2

Fingerprint = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
NodeName = Annotated[str, Field(min_length=1, max_length=64)]


class MessageError(ArmdiError):
    """A control message that cannot be decoded: bad JSON, unknown type or version,
    missing or wrong tag, or too large."""


class _Message(BaseModel):
    # No infinities or NaN: JSON has none, pydantic would write them as null, and the
    # receiver would refuse the message (found by fuzzing the decoder).
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    v: int = MESSAGE_VERSION


class _BlockRange(_Message):
    """A message about blocks ``[start, end)`` (``start == end``: no blocks)."""

    start: NonNegativeInt
    end: NonNegativeInt

    @model_validator(mode="after")
    def _start_not_after_end(self) -> _BlockRange:
        if self.start > self.end:
            raise ValueError(f"block range [{self.start}, {self.end}) runs backwards")
        return self


class Hello(_Message):
    """Source -> worker on joining: who I am and which model I serve."""

    type: Literal["hello"] = "hello"
    node: NodeName
    fingerprint: Fingerprint  # hex sha256 of the model, as in the manifest
    model_id: str
    blocks: NonNegativeInt  # K, the number of blocks of the model
    backends: tuple[str, ...] = ()
    pid: NonNegativeInt = 0


class HelloReply(_Message):
    """Worker -> source: whether it serves the same model, and if not, why."""

    type: Literal["hello_reply"] = "hello_reply"
    node: NodeName
    fingerprint: Fingerprint
    ok: bool
    reason: str = ""


class MemberInfo(_Message):
    """A worker as its peers reach it (membership: ``appliance.control.membership``)."""

    name: NodeName
    data_addr: str
    control_addr: str
    rank: NonNegativeInt = 0  # its place in the line (larger: further from the source)


class Configure(_BlockRange):
    """Assign ``node`` the blocks ``[start, end)`` and say where its output goes:
    activations to ``successor_addr``, results (when ``end`` is K) to ``result_addr``."""

    type: Literal["configure"] = "configure"
    node: NodeName
    successor_addr: str | None
    result_addr: str
    wire_dtype: WireDtype = "float32"
    chain: tuple[NodeName, ...] = ()  # live workers in order, source first
    # The adaptive controller (mode armdi): this node moves the boundary on its left, with
    # its predecessor (whose control address this is), toward equal stage times.
    adaptive: bool = False
    predecessor: NodeName | None = None
    predecessor_control_addr: str | None = None
    upstream_Bps: float | None = Field(default=None, gt=0)  # the predecessor's link (None: free)
    upstream_latency_ms: NonNegativeFloat = 0.0
    downstream_Bps: float | None = Field(default=None, gt=0)  # its own outgoing link (None: free)
    downstream_latency_ms: NonNegativeFloat = 0.0
    # The source run whose frames this node accepts from now on (hex of the stamp's session,
    # appliance.wire.replay); None: any.
    session: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    # Membership (Chord-like): this node as a member, and its next live successors, nearest
    # first (the first is ``successor_addr``'s node); empty: it is the last, or an old source.
    me: MemberInfo | None = None
    successors: tuple[MemberInfo, ...] = ()
    predecessor_member: MemberInfo | None = None
    anchor_control_addr: str | None = None  # the source's control listener (joins, repairs)


class MoveBoundary(_Message):
    """Worker -> its predecessor: end your range at ``boundary`` from now on (the boundary
    between the two moves; frames in flight stay correct, they say where they are)."""

    type: Literal["move_boundary"] = "move_boundary"
    node: NodeName  # who decided
    boundary: NonNegativeInt
    reason: str = ""


class SetSlowdown(_Message):
    """Change a node's emulated slowdown while it runs (experiments and demos)."""

    type: Literal["set_slowdown"] = "set_slowdown"
    factor: float = Field(ge=1.0, le=1e6)


class Fault(_Message):
    """Fault injection on the node itself (tests and demos): ``kill`` exits at once as if
    killed, ``pause`` stops serving (data, control, heartbeats) for ``seconds``, ``cut``
    drops everything it would send for ``seconds``, ``resume`` ends a cut early."""

    type: Literal["fault"] = "fault"
    action: Literal["kill", "pause", "cut", "resume"]
    seconds: float = Field(3.0, gt=0, le=3600)


class Ack(_Message):
    type: Literal["ack"] = "ack"
    ok: bool
    reason: str = ""


class StatusRequest(_Message):
    type: Literal["status_request"] = "status_request"


class NodeStatus(_BlockRange):
    type: Literal["node_status"] = "node_status"
    node: NodeName
    queue_depth: NonNegativeInt
    queue_capacity: NonNegativeInt
    processed: NonNegativeInt
    dropped: dict[str, NonNegativeInt] = Field(default_factory=dict)  # by reason
    compute_ms_ewma: NonNegativeFloat = 0.0
    send_ms_ewma: NonNegativeFloat = 0.0
    uptime_s: NonNegativeFloat = 0.0
    slowdown: float = Field(1.0, ge=1.0)
    speed: NonNegativeFloat = 0.0  # measured / profiled time of its segment (EWMA); 0: none yet
    link_Bps: NonNegativeFloat = 0.0  # bytes / send time of its output (EWMA); 0: none yet
    moves: NonNegativeInt = 0  # boundary moves this node decided
    last_move: str = ""  # the latest one, in words
    swap_ms: NonNegativeFloat = 0.0  # last move: decision -> first frame run with the range
    pid: NonNegativeInt = 0  # its process, for fault injection on the same machine
    fused_load_ms: NonNegativeFloat = 0.0  # last fused segment engine loaded in the background
    failovers: NonNegativeInt = 0  # frames it sent past a successor that stopped taking them
    resent: NonNegativeInt = 0  # ...of which sent again: they may have died with it
    successors: tuple[NodeName, ...] = ()  # its successor list now (membership)


class Heartbeat(_Message):
    type: Literal["heartbeat"] = "heartbeat"
    node: NodeName
    seq: NonNegativeInt
    sent_at: float  # the sender's time.time()


class StageReport(_BlockRange):
    """A worker's measured stage time over its last ``samples`` frames."""

    type: Literal["stage_report"] = "stage_report"
    node: NodeName
    compute_ms: NonNegativeFloat
    send_ms: NonNegativeFloat
    samples: NonNegativeInt


class Stabilise(_Message):
    """Worker -> its successor, every ``stabilise_ms``: who are your predecessor and
    successors? Doubles as Chord's notify: ``caller`` thinks it is your predecessor. The
    source's control listener answers it too (the anchor: the live members after
    ``caller``)."""

    type: Literal["stabilise"] = "stabilise"
    caller: MemberInfo


class StabiliseReply(_Message):
    type: Literal["stabilise_reply"] = "stabilise_reply"
    node: NodeName
    predecessor: MemberInfo | None = None
    successors: tuple[MemberInfo, ...] = ()


class Join(_Message):
    """A new or restarted worker asks to join, through any member's control address; a
    worker forwards it towards the source, which checks the model version, admits it and
    re-allocates. ``hops`` counts the forwards (a loop is refused)."""

    type: Literal["join"] = "join"
    member: MemberInfo
    fingerprint: Fingerprint
    model_id: str
    pid: NonNegativeInt = 0
    hops: NonNegativeInt = Field(0, le=16)


class Shutdown(_Message):
    type: Literal["shutdown"] = "shutdown"
    reason: str = ""


ControlMessage = Annotated[
    Hello | HelloReply | Configure | MoveBoundary | SetSlowdown | Fault | Ack | StatusRequest
    | NodeStatus | Heartbeat | StageReport | Stabilise | StabiliseReply | Join | Shutdown,
    Field(discriminator="type"),
]
_ADAPTER: Final[TypeAdapter[ControlMessage]] = TypeAdapter(ControlMessage)
MESSAGE_TYPES: Final[frozenset[str]] = frozenset(
    cls.model_fields["type"].default
    for cls in (Hello, HelloReply, Configure, MoveBoundary, SetSlowdown, Fault, Ack, StatusRequest,
                NodeStatus, Heartbeat, StageReport, Stabilise, StabiliseReply, Join, Shutdown)
)


def encode_message(msg: ControlMessage, key: bytes | None) -> bytes:
    """The envelope bytes of ``msg``, tagged under ``key`` when one is given."""
    body = msg.model_dump_json().encode()
    head = MAGIC + bytes((ENVELOPE_VERSION, FLAG_TAGGED if key is not None else 0))
    data = head + body
    if key is not None:
        data += hmac.digest(key, data, hashlib.sha256)
    return data


def decode_message(data: bytes | bytearray | memoryview, key: bytes | None,
                   max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> ControlMessage:
    """Check the envelope (size, magic, tag) and parse the message inside."""
    raw = bytes(data)
    if len(raw) > max_bytes:
        raise MessageError(f"control message of {len(raw)} bytes is over the {max_bytes} limit")
    if len(raw) < _HEAD_BYTES or raw[: len(MAGIC)] != MAGIC:
        raise MessageError(f"not an armdi control message (starts {raw[:8]!r})")
    version, flags = raw[len(MAGIC)], raw[len(MAGIC) + 1]
    if version != ENVELOPE_VERSION:
        raise MessageError(f"unsupported control envelope version {version} "
                           f"(this node speaks {ENVELOPE_VERSION})")
    if flags & ~FLAG_TAGGED:
        raise MessageError(f"unknown control envelope flags {flags:#04x}")
    body = _check_tag(raw, tagged=bool(flags & FLAG_TAGGED), key=key)
    try:
        obj: Any = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: too many
        # digits in an integer (and JSONDecodeError); RecursionError: nesting too deep
        raise MessageError(f"control message is not valid JSON: {err}") from err
    if not isinstance(obj, dict):
        raise MessageError(f"control message is a JSON {type(obj).__name__}, not an object")
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:  # a list is not even hashable
        raise MessageError(f"unknown control message type {kind!r:.80}")
    version = obj.get("v", MESSAGE_VERSION)
    if version != MESSAGE_VERSION:
        raise MessageError(f"{kind} message version {version!r:.20} is not supported "
                           f"(this node speaks {MESSAGE_VERSION})")
    try:
        return _ADAPTER.validate_python(obj)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or '(message)'}: {e['msg']}"
            for e in err.errors())
        raise MessageError(f"invalid {kind} message: {problems}") from err


def _check_tag(raw: bytes, *, tagged: bool, key: bytes | None) -> bytes:
    """The JSON body of ``raw`` once its tag (or its absence) is acceptable."""
    if key is None:
        if tagged:
            raise MessageError("control message is tagged but no cluster key is configured")
        return raw[_HEAD_BYTES:]
    if not tagged:
        raise MessageError("control message has no tag but a cluster key is configured")
    if len(raw) < _HEAD_BYTES + TAG_BYTES:
        raise MessageError("control message is too short to hold its tag")
    body_end = len(raw) - TAG_BYTES
    expected = hmac.digest(key, raw[:body_end], hashlib.sha256)
    if not hmac.compare_digest(expected, raw[body_end:]):
        raise MessageError("bad control message tag: wrong cluster key, or the message was "
                           "altered")
    return raw[_HEAD_BYTES:body_end]
