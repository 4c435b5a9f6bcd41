"""What the fuzz tests share: how many inputs to run, and hypothesis settings for that many.

``make test`` runs ``BASE_INPUTS`` inputs per decoder and ``BASE_API_REQUESTS`` API requests;
``make fuzz`` multiplies both by ``ARMDI_FUZZ_SCALE`` (20 by default there).
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, Phase, settings

BASE_INPUTS = 10_000
BASE_API_REQUESTS = 2_000


def scale() -> float:
    try:
        return max(0.001, float(os.environ.get("ARMDI_FUZZ_SCALE", "1")))
    except ValueError:
        return 1.0


def inputs(base: int = BASE_INPUTS) -> int:
    return max(1, round(base * scale()))


def fuzz_settings(examples: int) -> Any:
    """Run exactly ``examples`` generated inputs (no example database; the same inputs on
    every run of ``make test``, fresh ones on every run of ``make fuzz``: tests/conftest.py;
    a failure is shrunk and printed with the seed that reproduces it)."""
    return settings(max_examples=examples, deadline=None, database=None,
                    phases=(Phase.explicit, Phase.generate, Phase.shrink),
                    suppress_health_check=list(HealthCheck))
