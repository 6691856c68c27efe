"""The shared shell of the two routing convolutions: ``nn.Conv2d``'s parameters plus k and a criterion."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as TF
from ._args import KSpec, check_criterion, resolve_k


class RoutedConv2d(nn.Conv2d):
    """Subclasses set ``k_counts`` ("in" or "out" channels) and ``routing``, the name of the functional
    twin in :mod:`topkconv.functional` (a name, because functional imports this package)."""

    k_counts = "in"
    routing = "topk_conv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, k: KSpec, criterion: str = "max",
                 stride=1, padding=0, dilation=1, bias: bool = True, impl: str = "auto",
                 device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, bias=bias, device=device, dtype=dtype)
        if not isinstance(padding, (int, tuple)):
            raise ValueError(f"padding must be an int or a tuple, got {padding!r}")
        self.k = resolve_k(k, in_channels if self.k_counts == "in" else out_channels)
        self.criterion = check_criterion(criterion)
        self.impl = TF._check_impl(impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(TF, self.routing)(x, self.weight, self.bias, self.k, self.criterion,
                                         self.stride, self.padding, self.dilation, self.impl)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, criterion={self.criterion!r}"
