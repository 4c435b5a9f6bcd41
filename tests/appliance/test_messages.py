"""Control messages: every type round-trips, with and without a key; every error path."""

from __future__ import annotations

import hashlib
import json

import pydantic
import pytest

from appliance.wire import messages as m
from engines.errors import ArmdiError

FP = hashlib.sha256(b"model").hexdigest()
KEY = b"cluster-key"

SAMPLES: list[m.ControlMessage] = [
    m.Hello(node="source", fingerprint=FP, model_id="efficientnet_lite0", blocks=48,
            backends=("ort", "trt"), pid=1234),
    m.HelloReply(node="w1", fingerprint=FP, ok=False, reason="serves another model"),
    m.Configure(node="w1", start=3, end=17, successor_addr="tcp://10.0.0.2:5001",
                result_addr="ipc:///tmp/armdi/source.data", wire_dtype="float16",
                chain=("source", "w1", "w2")),
    m.Configure(node="w2", start=17, end=48, successor_addr=None,
                result_addr="tcp://10.0.0.1:5000", adaptive=True, predecessor="w1",
                predecessor_control_addr="tcp://10.0.0.2:5002", upstream_Bps=1.25e8,
                upstream_latency_ms=0.5),
    m.MoveBoundary(node="w2", boundary=20, reason="w1 | w2: boundary 17 -> 20"),
    m.SetSlowdown(factor=4.0),
    m.Fault(action="pause", seconds=3.0),
    m.Ack(ok=True),
    m.StatusRequest(),
    m.NodeStatus(node="w1", start=3, end=17, queue_depth=2, queue_capacity=8, processed=1000,
                 dropped={"bad_tag": 1, "send_failed": 4}, compute_ms_ewma=4.5,
                 send_ms_ewma=0.75, uptime_s=3600.0, slowdown=2.0, speed=1.1, link_Bps=1e9,
                 moves=3, last_move="w1 | w2: boundary 17 -> 20", swap_ms=12.5,
                 fused_load_ms=80.0),
    m.Heartbeat(node="w2", seq=7, sent_at=1_700_000_000.25),
    m.StageReport(node="w1", start=3, end=17, compute_ms=4.4, send_ms=0.8, samples=32),
    m.Configure(node="w1", start=0, end=4, successor_addr="ipc:///tmp/w2.data",
                result_addr="ipc:///tmp/source.data",
                me=m.MemberInfo(name="w1", data_addr="ipc:///tmp/w1.data",
                                control_addr="ipc:///tmp/w1.ctl", rank=1 << 20),
                successors=(m.MemberInfo(name="w2", data_addr="ipc:///tmp/w2.data",
                                         control_addr="ipc:///tmp/w2.ctl", rank=2 << 20),),
                anchor_control_addr="ipc:///tmp/source.ctl"),
    m.Stabilise(caller=m.MemberInfo(name="w1", data_addr="d", control_addr="c", rank=5)),
    m.StabiliseReply(node="w2", predecessor=None, successors=(
        m.MemberInfo(name="w3", data_addr="d3", control_addr="c3", rank=7),)),
    m.Join(member=m.MemberInfo(name="w9", data_addr="tcp://10.0.0.9:5001",
                               control_addr="tcp://10.0.0.9:5002"),
           fingerprint=FP, model_id="tiny", pid=42, hops=1),
    m.Shutdown(reason="operator asked"),
]


def test_an_old_configure_without_membership_fields_still_parses() -> None:
    old = {"type": "configure", "v": 1, "node": "w1", "start": 0, "end": 2,
           "successor_addr": None, "result_addr": "ipc:///tmp/s"}
    got = m.decode_message(envelope(old), None)
    assert isinstance(got, m.Configure) and got.successors == () and got.me is None


def body(data: bytes, key: bytes | None) -> bytes:
    return data[6 : len(data) - (m.TAG_BYTES if key else 0)]


def envelope(obj: object, key: bytes | None = None) -> bytes:
    raw = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
    head = m.MAGIC + bytes((m.ENVELOPE_VERSION, m.FLAG_TAGGED if key else 0))
    data = head + raw
    if key:
        import hmac

        data += hmac.digest(key, data, hashlib.sha256)
    return data


def test_every_message_type_has_a_sample() -> None:
    assert {s.type for s in SAMPLES} == m.MESSAGE_TYPES


@pytest.mark.parametrize("key", [None, KEY])
@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: s.type)
def test_round_trip(msg: m.ControlMessage, key: bytes | None) -> None:
    data = m.encode_message(msg, key)
    assert isinstance(data, bytes)
    json.loads(body(data, key))  # the body is plain JSON
    back = m.decode_message(data, key, 1 << 16)
    assert back == msg and type(back) is type(msg)


def test_messages_are_frozen_and_strict() -> None:
    with pytest.raises(pydantic.ValidationError):
        hello = SAMPLES[0]
        assert isinstance(hello, m.Hello)
        hello.node = "other"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        m.Ack(ok=True, extra=1)  # type: ignore[call-arg]
    with pytest.raises(pydantic.ValidationError, match="runs backwards"):
        m.StageReport(node="w", start=5, end=2, compute_ms=1, send_ms=1, samples=1)
    with pytest.raises(pydantic.ValidationError):
        m.Hello(node="s", fingerprint="not hex", model_id="x", blocks=1)


@pytest.mark.parametrize(("data", "message"), [
    (b"", "not an armdi control message"),
    (b"{\"type\": \"ack\"}", "not an armdi control message"),
    (m.MAGIC + bytes((2, 0)) + b"{}", "unsupported control envelope version 2"),
    (m.MAGIC + bytes((1, 0x80)) + b"{}", "unknown control envelope flags"),
    (envelope(b"{not json"), "not valid JSON"),
    (envelope(b"\xff\xfe"), "not valid JSON"),
    (envelope([1, 2]), "JSON list, not an object"),
    (envelope({"type": "launch_missiles"}), "unknown control message type 'launch_missiles'"),
    (envelope({"v": 1}), "unknown control message type None"),
    (envelope({"type": "ack", "v": 2, "ok": True}), "ack message version 2 is not supported"),
    (envelope({"type": "ack"}), "invalid ack message: ok: Field required"),
    (envelope({"type": "ack", "ok": True, "spare": 1}), "spare: Extra inputs"),
    (envelope({"type": "configure", "node": "w", "start": 4, "end": 1, "successor_addr": None,
               "result_addr": "x"}), "runs backwards"),
    (envelope({"type": "node_status", "node": "w", "start": 0, "end": 1, "queue_depth": -1,
               "queue_capacity": 1, "processed": 0}), "queue_depth: Input should be greater"),
])
def test_decode_errors(data: bytes, message: str) -> None:
    with pytest.raises(m.MessageError, match=message):
        m.decode_message(data, None, 1 << 16)


def test_oversize() -> None:
    data = m.encode_message(SAMPLES[6], None)
    assert m.decode_message(data, None, len(data)) == SAMPLES[6]
    with pytest.raises(m.MessageError, match=f"over the {len(data) - 1} limit"):
        m.decode_message(data, None, len(data) - 1)


def test_tag_errors() -> None:
    tagged = m.encode_message(m.Ack(ok=True), KEY)
    plain = m.encode_message(m.Ack(ok=True), None)
    with pytest.raises(m.MessageError, match="no tag but a cluster key"):
        m.decode_message(plain, KEY)
    with pytest.raises(m.MessageError, match="tagged but no cluster key"):
        m.decode_message(tagged, None)
    with pytest.raises(m.MessageError, match="bad control message tag"):
        m.decode_message(tagged, b"wrong key")
    for index in (7, -1):
        altered = bytearray(tagged)
        altered[index] ^= 0x20
        with pytest.raises(m.MessageError, match="bad control message tag"):
            m.decode_message(bytes(altered), KEY)
    with pytest.raises(m.MessageError, match="too short to hold its tag"):
        m.decode_message(m.MAGIC + bytes((1, 1)) + b"{}", KEY)


def test_decode_accepts_any_bytes_like() -> None:
    data = m.encode_message(SAMPLES[2], KEY)
    for buf in (bytearray(data), memoryview(data)):
        assert m.decode_message(buf, KEY) == SAMPLES[2]


def test_message_error_is_an_armdi_error() -> None:
    assert issubclass(m.MessageError, ArmdiError)
