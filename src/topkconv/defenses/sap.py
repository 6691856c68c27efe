"""SAP (Dhillon et al. 2018): stochastic activation pruning after every ReLU, at test time only."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..layers import StochasticActivationPruning
from .layer_swap import record, replace_modules
from .options import check_fraction
from .registry import Defense, register


@dataclass
class SAPConfig:
    kind: str = field(default="sap", init=False)
    sap_frac: float = field(default=0.8, metadata={"help": "sap: fraction of activations drawn, in (0, 1] (SAP-80)"})

    def __post_init__(self):
        self.sap_frac = check_fraction(self.sap_frac, "defense.sap_frac", closed_low=False, closed_high=True)


def apply(model: nn.Module, cfg: SAPConfig) -> nn.Module:
    """Every ``nn.ReLU`` becomes ``Sequential(ReLU, SAP)`` in the same slot, so parameter names stay.

    A ReLU module called at several places (torchvision's blocks reuse one) gets SAP at each; a
    functional ``F.relu`` in a ``forward`` cannot be seen and gets none.
    """
    names = replace_modules(model, nn.ReLU,
                            lambda relu: nn.Sequential(relu, StochasticActivationPruning(cfg.sap_frac)))
    record(model, [{"name": name, "replaced": "ReLU", "by": "Sequential(ReLU, StochasticActivationPruning)",
                    "sap_frac": cfg.sap_frac} for name in names])
    return model


SAP = register(Defense("sap", SAPConfig, apply, stochastic=True, test_time_only=True,
                       layer_types=(StochasticActivationPruning,), adaptive_attacks=("eot_pgd",),
                       description="stochastic activation pruning after every ReLU (eval mode only)"))
