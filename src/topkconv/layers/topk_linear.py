from __future__ import annotations

import torch
from torch import nn

from .. import functional as TF
from ._args import KSpec, resolve_k


class TopKLinear(nn.Linear):
    """Dynamic-k fully connected layer (Sun, Ravi and Singh 2019; Algorithm 1 of the paper).

    Per sample and output unit, the sum of the ``k`` largest signed products ``weight[c, i] * x[i]``
    plus the bias. ``k`` is a count in 1..in_features or a fraction in (0, 1]. Exactly ``k`` products
    are summed, as in the original code; ``positive_only=True`` keeps only positive ones (``|R| <= k``).
    Parameters are those of ``nn.Linear``, so a dense state_dict loads as it is.

    ``impl``: ``"auto"`` (default) and ``"fast"`` use the chunked exact kernels, bounded by
    :func:`topkconv.functional.set_memory_budget`; ``"reference"`` is the materialising formula.
    """

    def __init__(self, in_features: int, out_features: int, k: KSpec, bias: bool = True,
                 positive_only: bool = False, impl: str = "auto", device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.k = resolve_k(k, in_features)
        self.positive_only = positive_only
        self.impl = TF._check_impl(impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TF.topk_linear(x, self.weight, self.bias, self.k, self.positive_only, self.impl)

    def extra_repr(self) -> str:
        extra = ", positive_only=True" if self.positive_only else ""
        return f"{super().extra_repr()}, k={self.k}{extra}"
