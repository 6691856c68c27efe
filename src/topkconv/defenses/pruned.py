"""Gradual magnitude pruning (the LWM baseline): a post-training step, so the architecture stays standard.

The work is done by :mod:`topkconv.pruning` (``topkconv prune`` or a table's ``prune_from`` column) on a
trained standard model; this entry holds its options and keeps the standard architecture, into which a
pruned checkpoint (plain weights with exact zeros) loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from .options import check_choice, check_count, check_fraction
from .registry import Defense, register

# In the model's module order: the last nn.Linear, the last two, or every nn.Conv2d and nn.Linear.
PRUNE_SCOPES = ("final", "final2", "all")


@dataclass
class PrunedConfig:
    kind: str = field(default="pruned", init=False)
    prune_scope: str = field(default="final", metadata={"help": "pruned: layers pruned", "choices": PRUNE_SCOPES})
    prune_sparsity: float = field(default=0.9, metadata={"help": "pruned: final fraction of zero weights, in [0, 1)"})
    prune_epochs: int = field(default=3, metadata={"help": "pruned: fine-tuning epochs the schedule runs over"})
    prune_lr: Optional[float] = field(default=None, metadata={
        "help": "pruned: fine-tuning learning rate (default: a tenth of train.lr)"})

    def __post_init__(self):
        check_choice(self.prune_scope, PRUNE_SCOPES, "defense.prune_scope")
        self.prune_sparsity = check_fraction(self.prune_sparsity, "defense.prune_sparsity", closed_low=True,
                                             closed_high=False)
        check_count(self.prune_epochs, "defense.prune_epochs")
        if self.prune_lr is not None and not (isinstance(self.prune_lr, (int, float)) and self.prune_lr > 0):
            raise ValueError(f"defense.prune_lr must be a positive learning rate, got {self.prune_lr!r}")


def apply(model: nn.Module, cfg: PrunedConfig) -> nn.Module:
    return model  # pruning happens after training (topkconv.pruning), not in the architecture


PRUNED = register(Defense("pruned", PrunedConfig, apply,
                          description="magnitude pruning after training (topkconv prune); standard architecture"))
