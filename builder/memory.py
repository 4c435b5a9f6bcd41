"""Resident memory of the build: measuring it and keeping it under ``--max-memory``.

A Jetson shares its 8 GB between CPU and GPU, so the build holds at most one engine at a time
(see ``builder/verify.py``) and, given a budget, checks before each phase that the largest
engine it is about to open fits, and after each engine that it stayed inside. Figures come
from ``/proc/self/status`` (Linux); elsewhere the checks are skipped, never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engines.errors import BuildError

MB = 1 << 20
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": MB, "g": 1 << 30, "t": 1 << 40}

# An ONNX Runtime CPU session maps the external weights file (or, pre-packing, copies the
# large weights into MLAS's layout) and allocates its activations on top. Measured on vgg16
# (553 MB of weights, batch 1): the full model after one run held +642 MB without
# pre-packing, +493 MB with it.
SESSION_WEIGHT_FACTOR = 1.25
SESSION_OVERHEAD = 64 * MB


def parse_size(text: str, option: str = "--max-memory", minimum: int = MB) -> int:
    """``"2G"``, ``"1536M"``, ``"512MiB"``, ``"3GB"`` or plain bytes -> bytes; the units are
    powers of 1024 with or without ``B``/``iB``, as for every size option of ``armdi build``
    (``--max-memory``, ``--max-disk``). ``option`` names the flag in errors; sizes below
    ``minimum`` bytes are refused."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise BuildError(f"{option} {text!r}: give a size such as 2G, 1536M or 800MB")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if value < max(minimum, 1):
        floor = f"{minimum / MB:g} MB" if minimum >= MB else f"{max(minimum, 1)} B"
        raise BuildError(f"{option} {text!r} is too small (at least {floor})")
    return int(value)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes() -> int | None:
    """This process's resident memory now, or None where /proc is not available."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """The high-water mark of resident memory since start (or since ``reset_peak``)."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def children_peak_rss_bytes() -> int:
    """The largest peak of the child processes waited for so far (the export's), or 0."""
    try:
        import resource
    except ImportError:  # not on this platform
        return 0
    return int(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024


def reset_peak() -> bool:
    """Restart the high-water mark (Linux >= 4.0), so a phase's own peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def release_freed() -> None:
    """Hand freed heap memory back to the system (glibc's ``malloc_trim``; elsewhere a no-op),
    so that resident memory measures what the build holds, not what it once held."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def session_estimate(weight_bytes: int, activation_bytes: int) -> int:
    """What one ONNX Runtime session with these weights and activations adds to RSS."""
    return int(weight_bytes * SESSION_WEIGHT_FACTOR) + 4 * activation_bytes + SESSION_OVERHEAD


def fmt(nbytes: float) -> str:
    return f"{nbytes / (1 << 30):.2f} GB" if nbytes >= 1 << 30 else f"{nbytes / MB:.0f} MB"


@dataclass(frozen=True)
class MemoryBudget:
    """``--max-memory``: ``limit`` bytes of resident memory for the build, or no limit."""

    limit: int | None = None
    advice: str = ("raise --max-memory, build fewer or smaller segments (--segments "
                   "window:W, --max-blocks N), or build on a bigger machine and copy the "
                   "model folder")

    def require(self, needed: int, what: str, advice: str | None = None) -> None:
        """Refuse, before the work starts, a step estimated to need more than the budget."""
        if self.limit is None:
            return
        now = rss_bytes() or 0
        if now + needed > self.limit:
            raise BuildError(
                f"{what} needs about {fmt(needed)} on top of the {fmt(now)} the build "
                f"already holds; --max-memory {fmt(self.limit)} is not enough: "
                f"{advice or self.advice}")

    def check(self, where: str) -> None:
        """Stop the build if it has grown past the budget (measured, not estimated)."""
        if self.limit is None:
            return
        now = rss_bytes()
        if now is not None and now > self.limit:
            raise BuildError(
                f"the build used {fmt(now)} while {where}, over --max-memory "
                f"{fmt(self.limit)}: {self.advice}")
