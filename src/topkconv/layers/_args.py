"""Argument checks shared by the routing layers, so every layer words its errors the same way."""

from __future__ import annotations

import math
import warnings
from typing import Union

from .kernels.backends import BACKENDS

KSpec = Union[int, float]

CRITERIA = ("max", "sum")


def resolve_k(k: KSpec, fan: int, name: str = "k") -> int:
    """Turn ``k`` (an int count, or a float fraction of ``fan`` in (0, 1]) into a count in 1..fan.

    A fraction is rounded up, so ``k=0.1`` of 25088 inputs keeps 2509 of them.
    """
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ValueError(f"{name} must be an int in 1..{fan} or a float fraction in (0, 1], got {k!r}")
    if isinstance(k, float):
        if not (0.0 < k <= 1.0) or math.isnan(k):
            raise ValueError(f"{name} as a fraction must lie in (0, 1], got {k!r} (fan-in is {fan})")
        return max(1, math.ceil(k * fan - 1e-9))
    if not 1 <= k <= fan:
        raise ValueError(f"{name} must lie in 1..{fan} (the fan-in), got {k}")
    return int(k)


def check_criterion(criterion: str) -> str:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    return criterion


def check_frac(frac: float, name: str = "frac") -> float:
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not (0.0 < float(frac) <= 1.0):
        raise ValueError(f"{name} must lie in (0, 1], got {frac!r}")
    return float(frac)


# The user-facing kernel choices, one list: "auto" the fastest backend that supports the inputs (the
# numba loops on CPU float32/float64, else the torch-level kernels), then every kernel backend by its
# name (kernels/backends.py: "numba" the compiled CPU loops, "torch" the torch-level kernels), then
# "reference", the paper's materialising formula.
IMPLS = ("auto", *BACKENDS, "reference")
# Old names still accepted for one release, with a DeprecationWarning.
DEPRECATED_IMPLS = {"fast": "torch"}


def check_impl(impl: str) -> str:
    """``impl`` as one of :data:`IMPLS` (a deprecated name mapped to its successor, with a warning)."""
    if impl in DEPRECATED_IMPLS:
        warnings.warn(f"impl={impl!r} is deprecated; use impl={DEPRECATED_IMPLS[impl]!r} (the same kernels)",
                      DeprecationWarning, stacklevel=3)
        return DEPRECATED_IMPLS[impl]
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl
