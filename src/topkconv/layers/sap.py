"""SAP (Dhillon et al. 2018): its functional form and its module."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._args import check_frac
from .bpda import gradient_mode, straight_through
from .kernels.sampling import categories_hit


def stochastic_activation_pruning(h: torch.Tensor, frac: float = 0.8,
                                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """SAP (Dhillon et al. 2018), per sample: draw ``r = round(frac * n)`` activations with replacement,
    with probability ``|h_j| / sum |h|``; keep the drawn ones, scaled by ``1 / (1 - (1 - p_j)^r)``.

    The expectation of the output equals ``h``. Under BPDA (dense or soft) the gradient is the
    identity's: SAP has no top-k selection to relax, and its expectation is the identity."""
    frac = check_frac(frac)
    flat = h.reshape(h.shape[0], -1)
    draws = max(1, round(frac * flat.shape[1]))
    magnitude = flat.detach().abs()
    p = magnitude / magnitude.sum(1, keepdim=True).clamp_min(torch.finfo(magnitude.dtype).tiny)
    # a zero activation is never drawn, but a row of zeros (or a rounding at the last bin edge) can mark one:
    # its scale must be 0, not 1 / 0, or its gradient would be
    kept = categories_hit(magnitude, draws, generator) & (magnitude > 0)
    # 1 - (1 - p)^r, stable for small p (p == 1 gives 1)
    keep_prob = p.neg_().log1p_().mul_(draws).expm1_().neg_()
    scale = keep_prob.clamp_min_(torch.finfo(p.dtype).tiny).reciprocal_().mul_(kept)
    out = (flat * scale).reshape_as(h)
    return straight_through(out, h) if gradient_mode() != "exact" else out


class StochasticActivationPruning(nn.Module):
    """SAP (Dhillon et al. 2018): stochastic, magnitude-weighted activation pruning at test time.

    Acts only in eval mode; in train mode it is the identity. ``frac=0.8`` is SAP-80: the number of
    draws is 80% of the activations of a sample. Pass a ``torch.Generator`` for reproducible draws.
    """

    def __init__(self, frac: float = 0.8, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.frac = check_frac(frac)
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return x
        return stochastic_activation_pruning(x, self.frac, self.generator)

    def extra_repr(self) -> str:
        return f"frac={self.frac}"
