"""Models built to defeat gradient attacks in one specific way each, for the masking checks and indicators.

Each wraps a trained plain model (a conftest.py fixture) and changes only what its docstring says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Gate(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a per-example 0/1 ``keep`` mask."""

    @staticmethod
    def forward(ctx, x, keep):
        ctx.save_for_backward(keep)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep.view(-1, *([1] * (grad.dim() - 1))).to(grad.dtype), None


class RoundedInput(nn.Module):
    """Rounds its input to 16 grey levels: the gradient is zero everywhere (shattered gradients)."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(torch.round(x * 16) / 16)


class GradientOnlyOnTheDataGrid(nn.Module):
    """True gradient at images on the digits' 1/16 grid (clean ones), zero anywhere else: one FGSM
    step from the clean image works, PGD from a random start is stuck."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        on_grid = ((x * 16 - torch.round(x * 16)).abs() < 1e-4).flatten(1).all(1)
        return self.base(_Gate.apply(x, on_grid))


class RandomlyGatedGradient(nn.Module):
    """Deterministic forward; the gradient reaches an example only with probability 0.1 per step, so
    PGD's result keeps moving with more steps or restarts."""

    def __init__(self, base, p=0.1):
        super().__init__()
        self.base, self.p = base, p
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x):
        keep = torch.rand(x.shape[0], generator=self.generator) < self.p
        return self.base(_Gate.apply(x, keep))


class StochasticInputDropout(nn.Module):
    """A stochastic forward pass: half of the input pixels dropped at random in eval mode too."""

    def __init__(self, base, p=0.5):
        super().__init__()
        self.base, self.p = base, p

    def forward(self, x):
        return self.base(F.dropout(x, self.p, training=True))


class _ZeroBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros_like(grad)


class ZeroedTopKActivation(nn.Module):
    """k-winners-take-all after the base's first layer block: per example only the k largest activations
    pass, and the backward pass of the selection is zeroed (the k-WTA failure mode, made total)."""

    def __init__(self, base, split: int, k: int):
        super().__init__()
        self.head, self.tail, self.k = base[:split], base[split:], k

    def forward(self, x):
        h = self.head(x)
        flat = h.flatten(1)
        keep = torch.zeros_like(flat).scatter_(1, flat.topk(self.k, dim=1).indices, 1.0).view_as(h)
        return self.tail(_ZeroBackward.apply(h * keep))
