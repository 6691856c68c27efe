"""BPDA through top-k (Athalye et al. 2018): PGD whose backward passes every routing layer through a
differentiable stand-in, the dense layer (``bpda_dense``) or a sigmoid relaxation of its selection
(``bpda_soft``), with the forward pass exact. They run on models whose defence names them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..layers import dense_gradients, soft_gradients
from .pgd import plan_pgd
from .registry import WHITEBOX, Attack, PlanContext, Planned, Role, budget_field, register


@dataclass
class BpdaSoftBudget:
    tau: Optional[float] = budget_field(default=None, positive=True,
                                        help="soft BPDA temperature for every layer (unset: per layer from the "
                                             "score spread)")


def _dense(ctx: PlanContext, eps: float) -> Planned:
    return plan_pgd(ctx, eps, "zero", gradients=lambda: dense_gradients(True),
                    extra={"bpda": "dense gradients through every top-k layer"})


def _soft(ctx: PlanContext, eps: float) -> Planned:
    tau = ctx.budget("bpda_soft").tau
    return plan_pgd(ctx, eps, "zero", gradients=lambda: soft_gradients(tau=tau),
                    extra={"bpda": "a sigmoid relaxation of every top-k layer's selection (forward exact)",
                           "tau": "per layer from the score spread" if tau is None else tau})


register(Attack("bpda_dense", _dense, Role.BPDA, cascadable=True, must_not_beat=(WHITEBOX,),
                description="PGD through the dense stand-in of every top-k layer"))
register(Attack("bpda_soft", _soft, Role.BPDA, config=BpdaSoftBudget, cascadable=True, must_not_beat=(WHITEBOX,),
                description="PGD through a soft relaxation of every top-k layer's selection"))
