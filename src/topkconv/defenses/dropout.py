"""Dropout before the final linear layer (a training-time regulariser, the Table I baseline)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .layer_swap import layers_in_order, record, swap
from .options import check_fraction
from .registry import Defense, register


class DropoutLinear(nn.Linear):
    """``nn.Linear`` applied to ``Dropout(p)`` of its input: dropout in front of a layer without a new slot,
    so the layer keeps its parameter names (``classifier.3.weight``) and a dense state_dict loads as it is."""

    def __init__(self, in_features: int, out_features: int, p: float = 0.5, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.dropout = nn.Dropout(p)

    @classmethod
    def from_linear(cls, linear: nn.Linear, p: float) -> "DropoutLinear":
        """The layer with dropout ``p`` in front, sharing ``linear``'s Parameter objects."""
        new = cls(linear.in_features, linear.out_features, p, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.dropout(x), self.weight, self.bias)


@dataclass
class DropoutConfig:
    kind: str = field(default="dropout", init=False)
    dropout_p: float = field(default=0.5, metadata={"help": "dropout: p before the final FC layer, in [0, 1)"})

    def __post_init__(self):
        self.dropout_p = check_fraction(self.dropout_p, "defense.dropout_p", closed_low=True, closed_high=False)


def apply(model: nn.Module, cfg: DropoutConfig) -> nn.Module:
    """The last ``nn.Linear`` (definition order) becomes a :class:`DropoutLinear` with ``cfg.dropout_p``."""
    linears = layers_in_order(model, nn.Linear)
    if not linears:
        raise ValueError("defense 'dropout' needs a final nn.Linear layer; the model has none")
    name, final = linears[-1]
    swap(model, name, DropoutLinear.from_linear(final, cfg.dropout_p))
    record(model, [{"name": name, "replaced": type(final).__name__, "by": "DropoutLinear", "p": cfg.dropout_p}])
    return model


DROPOUT = register(Defense("dropout", DropoutConfig, apply, layer_types=(DropoutLinear,),
                           description="dropout before the final FC layer (training only)"))
