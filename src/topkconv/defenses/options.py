"""Checks of defence options, run when a config is made, so a bad value fails before any model is built.

Messages name the option as the spec does (``defense.conv_k``); the CLI puts its flag in front.
"""

from __future__ import annotations

import math
from typing import Sequence


def check_k_value(k, name: str):
    """A k before any layer is known: an int count >= 1 or a float fraction in (0, 1]."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ValueError(f"{name} must be an int count or a float fraction in (0, 1], got {k!r}")
    if isinstance(k, float) and (math.isnan(k) or not 0.0 < k <= 1.0):
        raise ValueError(f"{name} as a fraction must lie in (0, 1], got {k!r} (write a count as an int)")
    if isinstance(k, int) and k < 1:
        raise ValueError(f"{name} as a count must be at least 1, got {k!r}")
    return k


def check_choice(value, choices: Sequence, name: str):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def check_fraction(value, name: str, closed_low: bool, closed_high: bool) -> float:
    """``value`` as a float in the interval from 0 to 1 with the given closed ends."""
    low, high = ("[" if closed_low else "("), ("]" if closed_high else ")")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value) and \
        (0.0 <= value if closed_low else 0.0 < value) and (value <= 1.0 if closed_high else value < 1.0)
    if not ok:
        raise ValueError(f"{name} must lie in {low}0, 1{high}, got {value!r}")
    return float(value)


def check_count(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int of at least {minimum}, got {value!r}")
    return value
