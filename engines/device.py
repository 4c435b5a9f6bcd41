"""This device's name for its latency profiles: profiles belong to a device, not to a model."""

from __future__ import annotations

import os
import platform
import re


def device_signature() -> str:
    """A stable name for this kind of device: architecture, CPU model, core count."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware")):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpu = re.sub(r"[^A-Za-z0-9]+", "-", cpu).strip("-")[:48] or "cpu"
    return f"{platform.machine()}-{cpu}-{os.cpu_count()}c"
