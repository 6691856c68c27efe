"""BPDA switch: top-k layers keep their forward pass but back-propagate the dense layer's gradient.

Athalye et al. (2018) attack a non-differentiable or masking component through a differentiable
stand-in. For top-k routing the natural stand-in is the dense layer with the same weights.

    with topkconv.layers.dense_gradients():
        x_adv = pgd(model, x, y, ...)
"""

from __future__ import annotations

import contextlib
import threading

import torch

_state = threading.local()


def bpda_enabled() -> bool:
    return getattr(_state, "enabled", False)


@contextlib.contextmanager
def dense_gradients(enabled: bool = True):
    """Inside this block every routing layer's backward pass is that of its dense stand-in."""
    previous = bpda_enabled()
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = previous


def straight_through(sparse_out: torch.Tensor, dense_out: torch.Tensor) -> torch.Tensor:
    """Value of ``sparse_out``, gradient of ``dense_out``."""
    return sparse_out.detach() + (dense_out - dense_out.detach())
