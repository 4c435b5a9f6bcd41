"""The replay guard: new frames pass, byte-identical copies and stale frames do not."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.wire import frames as fr
from appliance.wire.replay import (
    ReplayError,
    ReplayGuard,
    Stamper,
    read_stamp,
    stamp_record,
)

KEY = bytes(range(32))
FP = bytes(32)


def _frame(ext: bytes, trace: tuple[fr.TraceEntry, ...] = ()) -> fr.Frame:
    return fr.Frame(kind=fr.FrameKind.ACTIVATION, request_id=1, attempt=1, fingerprint=FP,
                    start_block=0, tensor=np.zeros((1, 4), np.float32), trace=trace, ext=ext)


def _receive(guard: ReplayGuard, frame: fr.Frame, key: bytes | None = KEY) -> None:
    buf = fr.encode_frame(frame, key)
    decoded = fr.decode_frame(buf, key=key, max_bytes=1 << 20)
    guard.check(decoded, buf, tagged=key is not None)


def _reason(guard: ReplayGuard, frame: fr.Frame, key: bytes | None = KEY) -> str:
    with pytest.raises(ReplayError) as info:
        _receive(guard, frame, key)
    return info.value.reason


def test_a_captured_frame_replayed_is_rejected() -> None:
    stamper = Stamper()
    guard = ReplayGuard(require=True)
    guard.expect(stamper.session)
    frame = _frame(stamper.next())
    _receive(guard, frame)
    assert _reason(guard, frame) == "replay"


def test_resends_are_new_frames_and_pass() -> None:
    stamper = Stamper()
    guard = ReplayGuard(require=True)
    for _ in range(100):
        _receive(guard, _frame(stamper.next()))


def test_a_rerouted_frame_with_the_same_stamp_but_other_bytes_passes() -> None:
    stamper = Stamper()
    guard = ReplayGuard(require=True)
    ext = stamper.next()
    _receive(guard, _frame(ext, (fr.TraceEntry("w1", 0, 2, 1.0),)))
    _receive(guard, _frame(ext, (fr.TraceEntry("w1", 0, 2, 1.0), fr.TraceEntry("w2", 2, 3, 1.0))))
    assert _reason(guard, _frame(ext, (fr.TraceEntry("w1", 0, 2, 1.0),))) == "replay"


def test_untagged_frames_are_told_apart_too() -> None:
    stamper = Stamper()
    guard = ReplayGuard(require=False)
    ext = stamper.next()
    _receive(guard, _frame(ext), key=None)
    assert _reason(guard, _frame(ext), key=None) == "replay"
    _receive(guard, _frame(b""), key=None)  # no key, no stamp: accepted (nothing to check)


def test_a_frame_outside_the_window_is_stale() -> None:
    session = bytes(16)
    guard = ReplayGuard(require=True, window=10)
    _receive(guard, _frame(stamp_record(session, 100)))
    _receive(guard, _frame(stamp_record(session, 95)))  # late but inside: passes
    assert _reason(guard, _frame(stamp_record(session, 90))) == "stale_frame"


def test_the_window_stays_bounded() -> None:
    session = bytes(16)
    guard = ReplayGuard(require=True, window=8)
    for counter in range(1, 1000):
        _receive(guard, _frame(stamp_record(session, counter)))
    assert len(guard._sessions[session].seen) <= 16


def test_another_session_and_a_missing_stamp_are_refused() -> None:
    guard = ReplayGuard(require=True)
    guard.expect(Stamper().session)
    assert _reason(guard, _frame(Stamper().next())) == "wrong_session"
    assert _reason(guard, _frame(b"")) == "no_stamp"


def test_extension_records_parse_and_unknown_ones_are_skipped() -> None:
    other = bytes((7, 3, 1, 2, 3))
    stamp = read_stamp(other + stamp_record(b"s" * 16, 42))
    assert stamp is not None and stamp.counter == 42 and stamp.session == b"s" * 16
    assert read_stamp(other) is None
    for bad in (b"\x01", b"\x01\x18" + bytes(5), b"\x01\x02ab", b"\x09\x05ab"):
        with pytest.raises(ReplayError) as info:
            read_stamp(bad)
        assert info.value.reason == "bad_extension"
