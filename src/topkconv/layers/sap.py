"""SAP (Dhillon et al. 2018): its functional form and its module."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._args import check_frac
from .bpda import gradient_mode, straight_through


def stochastic_activation_pruning(h: torch.Tensor, frac: float = 0.8,
                                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """SAP (Dhillon et al. 2018), per sample: draw ``r = round(frac * n)`` activations with replacement,
    with probability ``|h_j| / sum |h|``; keep the drawn ones, scaled by ``1 / (1 - (1 - p_j)^r)``.

    The expectation of the output equals ``h``. Under BPDA (dense or soft) the gradient is the
    identity's: SAP has no top-k selection to relax, and its expectation is the identity."""
    frac = check_frac(frac)
    flat = h.reshape(h.shape[0], -1)
    n = flat.shape[1]
    draws = max(1, round(frac * n))
    magnitude = flat.detach().abs()
    total = magnitude.sum(1, keepdim=True)
    alive = total.squeeze(1) > 0
    p = torch.where(total > 0, magnitude / total.clamp_min(torch.finfo(magnitude.dtype).tiny),
                    torch.full_like(magnitude, 1.0 / n))
    sampled = torch.multinomial(p, draws, replacement=True, generator=generator)
    kept = torch.zeros_like(p, dtype=torch.bool).scatter_(1, sampled, True) & alive[:, None]
    keep_prob = -torch.expm1(draws * torch.log1p(-p.clamp(max=1.0 - 1e-12)))  # 1 - (1 - p)^r, stable
    scale = torch.where(kept, 1.0 / keep_prob.clamp_min(torch.finfo(p.dtype).tiny), torch.zeros_like(p))
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
