"""Replay protection: a stamp in every frame's extension section, and a guard that checks it.

The source stamps each frame it makes (every attempt of every request) with its **session**
(16 random bytes drawn when the source starts) and a **counter** (one more per frame). Workers
carry the extension unchanged hop to hop, so the stamp says which frame of which source run
this is; under a cluster key the HMAC tag covers it, so it cannot be altered or stripped.

A receiver (each worker, and the source for results) keeps, per session, the highest counter
seen and a window of the counters below it with a digest of each frame seen under them:

- a frame whose counter is ``window`` or more below the highest is **stale** (outside its
  window): dropped;
- a frame whose stamp *and* bytes were already seen is a **replay**: dropped. A frame with a
  seen stamp but other bytes passes: a frame re-routed around a dead worker carries the same
  stamp with another trace, and it must pass. A re-send from the source is a new frame (a new
  counter) and passes;
- a frame of a session this node was not configured for (``Configure.session``; the source
  accepts only its own) is **wrong_session**: a frame from another source run, or another
  cluster sharing the key;
- under a cluster key, a frame without a stamp is refused (**no_stamp**).

The extension section is a list of records, ``type u8 | length u8 | value``; unknown types are
skipped, so later versions can add their own. The stamp is type 1, 24 bytes: session, counter
(u64 little-endian).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from appliance.wire.frames import TAG_BYTES, Frame, FrameError

STAMP_TYPE: Final = 1
SESSION_BYTES: Final = 16
_STAMP: Final = struct.Struct("<16sQ")
_RECORD: Final = struct.Struct("<BB")
DEFAULT_WINDOW: Final = 4096  # counters; the source keeps at most a few hundred frames in flight
DEFAULT_MAX_SESSIONS: Final = 8


class ReplayError(FrameError):
    """A frame the replay guard refuses; ``reason`` names the counter."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Stamp:
    session: bytes
    counter: int


def stamp_record(session: bytes, counter: int) -> bytes:
    """The extension record of a stamp."""
    return _RECORD.pack(STAMP_TYPE, _STAMP.size) + _STAMP.pack(session, counter)


def read_stamp(ext: bytes) -> Stamp | None:
    """The stamp in an extension section (None when it has none); ``ReplayError``
    (``bad_extension``) when the records do not parse."""
    pos, size = 0, len(ext)
    while pos < size:
        if pos + _RECORD.size > size:
            raise ReplayError("bad_extension", "extension record header runs past the section")
        kind, length = _RECORD.unpack_from(ext, pos)
        start = pos + _RECORD.size
        if start + length > size:
            raise ReplayError("bad_extension", f"extension record {kind} runs past the section")
        if kind == STAMP_TYPE:
            if length != _STAMP.size:
                raise ReplayError("bad_extension", f"stamp of {length} bytes, not {_STAMP.size}")
            session, counter = _STAMP.unpack_from(ext, start)
            return Stamp(session, counter)
        pos = start + length
    return None


class Stamper:
    """Makes the stamps of one source run: one session, a counter shared by its threads."""

    def __init__(self, session: bytes | None = None) -> None:
        self.session = session if session is not None else os.urandom(SESSION_BYTES)
        if len(self.session) != SESSION_BYTES:
            raise ValueError(f"a session is {SESSION_BYTES} bytes")
        self._counter = itertools.count(1)  # next() is atomic under the GIL

    def next(self) -> bytes:
        """The extension section of the next frame (a fresh stamp)."""
        return stamp_record(self.session, next(self._counter))


class _Window:
    __slots__ = ("seen", "top")

    def __init__(self) -> None:
        self.top = 0
        self.seen: OrderedDict[int, tuple[bytes, ...]] = OrderedDict()


class ReplayGuard:
    """Checks the stamps of received frames (see the module docstring). Thread-safe."""

    def __init__(self, *, require: bool, window: int = DEFAULT_WINDOW,
                 max_sessions: int = DEFAULT_MAX_SESSIONS) -> None:
        if window < 1 or max_sessions < 1:
            raise ValueError("window and max_sessions must be at least 1")
        self.require = require
        self.window = window
        self.max_sessions = max_sessions
        self._expected: bytes | None = None
        self._sessions: OrderedDict[bytes, _Window] = OrderedDict()
        self._lock = threading.Lock()

    def expect(self, session: bytes | None) -> None:
        """Accept frames of ``session`` only, from now on (None: of any session)."""
        with self._lock:
            self._expected = session

    def check(self, frame: Frame, buf: bytes | bytearray | memoryview, *, tagged: bool) -> None:
        """Raise ``ReplayError`` unless ``frame`` (decoded from ``buf``) is new here."""
        stamp = read_stamp(frame.ext) if frame.ext else None
        if stamp is None:
            if self.require:
                raise ReplayError("no_stamp", "frame has no replay stamp (a cluster key is "
                                              "configured, so every frame must have one)")
            return
        digest = _digest(buf, tagged)
        with self._lock:
            if self._expected is not None and stamp.session != self._expected:
                raise ReplayError("wrong_session", f"frame of session {stamp.session.hex()[:8]}, "
                                  f"this node serves session {self._expected.hex()[:8]}")
            win = self._sessions.get(stamp.session)
            if win is None:
                win = self._sessions[stamp.session] = _Window()
                while len(self._sessions) > self.max_sessions:
                    self._sessions.popitem(last=False)
            else:
                self._sessions.move_to_end(stamp.session)
            counter = stamp.counter
            if counter + self.window <= win.top:
                raise ReplayError("stale_frame", f"frame {counter} is outside the window "
                                  f"(the newest is {win.top}, the window {self.window})")
            digests = win.seen.get(counter, ())
            if digest in digests:
                raise ReplayError("replay", f"frame {counter} of session "
                                  f"{stamp.session.hex()[:8]} was already received")
            win.seen[counter] = (*digests, digest)
            if counter > win.top:
                win.top = counter
                floor = counter - self.window
                while win.seen:
                    oldest = next(iter(win.seen))
                    if oldest > floor and len(win.seen) <= 2 * self.window:
                        break
                    win.seen.popitem(last=False)


def _digest(buf: bytes | bytearray | memoryview, tagged: bool) -> bytes:
    """What tells two frames with one stamp apart: the HMAC tag of a tagged frame (it covers
    every byte), else a hash of the header and trace and of the last bytes."""
    view = memoryview(buf)
    if tagged and len(view) >= TAG_BYTES:
        return bytes(view[-TAG_BYTES:])
    h = hashlib.blake2b(view[:1024], digest_size=16)
    h.update(view[-64:])
    h.update(len(view).to_bytes(8, "little"))
    return h.digest()
