"""The deadline record of a frame's extension section (records: ``type u8 | length u8 |
value``; the replay stamp, type 1, is in ``appliance.wire.replay``).

Type 2, 4 bytes: the attempt's **remaining budget** in milliseconds (u32) when the frame was
sent. A relative budget, not a time of day, so no two devices need agreeing clocks: each
node subtracts the time a frame spent with it (from its arrival to its departure) before
sending it on, and drops a frame whose budget ran out instead of computing it. The source
puts the record first, so a node finds it at offset 0 without walking the records.

The budget is the attempt's: when it runs out the source has re-sent the request (or given
up on it), so the frame's work is no longer wanted. It leaves out the time a frame spends
on the wire and in a node's receive buffer, so it errs on the side of computing.
"""

from __future__ import annotations

import struct
from typing import Final

DEADLINE_TYPE: Final = 2
_DEADLINE: Final = struct.Struct("<BBI")
_PREFIX: Final = bytes((DEADLINE_TYPE, 4))
MAX_BUDGET_MS: Final = 0xFFFF_FFFF


def deadline_record(budget_ms: float) -> bytes:
    """The record for ``budget_ms`` milliseconds left (clamped to 0..2**32-1)."""
    return _DEADLINE.pack(DEADLINE_TYPE, 4, min(MAX_BUDGET_MS, max(0, int(budget_ms))))


def budget_ms(ext: bytes) -> int | None:
    """The budget of an extension section that starts with a deadline record, else None."""
    if ext[:2] != _PREFIX or len(ext) < _DEADLINE.size:
        return None
    return int(_DEADLINE.unpack_from(ext)[2])


def with_budget(ext: bytes, budget: float) -> bytes:
    """``ext`` with its leading deadline record's budget replaced (it must have one)."""
    return deadline_record(budget) + ext[_DEADLINE.size:]


ENCODED_TYPE: Final = 3
"""Type 3, no value: the payload is an encoded image (JPEG/PNG bytes as a uint8 row of shape
``(1, n)``), decoded and preprocessed by the node that runs block 0 (``ddi_input = "jpeg"``)."""
ENCODED_RECORD: Final = bytes((ENCODED_TYPE, 0))


def has_record(ext: bytes, record_type: int) -> bool:
    """Whether the extension section holds a record of ``record_type`` (a malformed tail,
    cut short, counts as not holding it)."""
    i, size = 0, len(ext)
    while i + 2 <= size:
        if ext[i] == record_type:
            return True
        i += 2 + ext[i + 1]
    return False
