from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import functional as TF
from ._args import check_frac


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
        return TF.stochastic_activation_pruning(x, self.frac, self.generator)

    def extra_repr(self) -> str:
        return f"frac={self.frac}"
