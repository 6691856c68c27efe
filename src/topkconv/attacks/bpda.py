"""BPDA through top-k (Athalye et al. 2018): PGD whose backward passes every routing layer through a
differentiable stand-in, the dense layer (``bpda_dense``) or a sigmoid relaxation of its selection
(``bpda_soft``), with the forward pass exact. They run on models whose defence names them.

Each stand-in also makes a surrogate of the same defended model, the *stand-in model* (its forward value the
stand-in's too, :func:`stand_in_model`): Pintor et al.'s transfer failure (NeurIPS 2022) attacks it with the
BPDA attack's own budget (:func:`plan_on_stand_in`) and judges the points on the real model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

from ..layers import dense_gradients, soft_gradients
from ..layers.bpda import stand_in_values
from .pgd import pgd, plan_pgd, step_at
from .registry import WHITEBOX, Attack, PlanContext, Planned, Role, budget_field, register


@dataclass
class BpdaSoftBudget:
    tau: Optional[float] = budget_field(default=None, positive=True,
                                        help="soft BPDA temperature for every layer (unset: per layer from the "
                                             "score spread)")


# BPDA attack (registry name) -> the layers' gradient mode of its stand-in, for a plan context.
STAND_INS = {"bpda_dense": lambda ctx: dense_gradients(True),
             "bpda_soft": lambda ctx: soft_gradients(tau=ctx.budget("bpda_soft").tau)}


@contextlib.contextmanager
def stand_in_model(ctx: PlanContext, name: str) -> Iterator[None]:
    """Inside this block ``ctx.model`` is the stand-in model of BPDA attack ``name`` (a :data:`STAND_INS`
    key): every routing layer computes its stand-in's value and gradient, the model's other layers as they are."""
    if name not in STAND_INS:
        raise ValueError(f"stand-in: expected a BPDA attack among {', '.join(STAND_INS)}, got {name!r}")
    with STAND_INS[name](ctx), stand_in_values():
        yield


def plan_on_stand_in(ctx: PlanContext, name: str, eps: float) -> Planned:
    """BPDA attack ``name``'s budget (``[attack.pgd]``'s steps and step at ``eps``, 0-255 units) spent by PGD
    from the clean point on its stand-in model itself (the forward pass and the loss are the stand-in
    model's, as for any surrogate), returning the last iterate (``keep="last"``). The first adversarial
    iterate :func:`.pgd.pgd` returns by default lies just across the surrogate's boundary and fails on any
    model whose boundary lies a little further, so the transfer failure's attack runs to the end of its
    budget, as Pintor et al.'s attacks (secml's and foolbox's PGD) do. Measured on the digits Dynamic-k MLP
    at 8/255: its soft stand-in's first adversarial points failed on the model for 4 of 5 examples, its last
    iterates for 0 of 5."""
    steps, step = ctx.budget("pgd").steps, step_at(ctx, eps)

    def run(x, y, generator, seed):
        with stand_in_model(ctx, name):
            return pgd(ctx.model, x, y, eps / 255, step / 255, steps, start="zero", keep="last")

    return Planned({"eps": eps, "step_size": step, "steps": steps, "start": "zero",
                    "surrogate": f"the stand-in model of {name}"}, run)


def _dense(ctx: PlanContext, eps: float) -> Planned:
    return plan_pgd(ctx, eps, "zero", gradients=lambda: STAND_INS["bpda_dense"](ctx),
                    extra={"bpda": "dense gradients through every top-k layer"})


def _soft(ctx: PlanContext, eps: float) -> Planned:
    tau = ctx.budget("bpda_soft").tau
    return plan_pgd(ctx, eps, "zero", gradients=lambda: STAND_INS["bpda_soft"](ctx),
                    extra={"bpda": "a sigmoid relaxation of every top-k layer's selection (forward exact)",
                           "tau": "per layer from the score spread" if tau is None else tau})


register(Attack("bpda_dense", _dense, Role.BPDA, cascadable=True, must_not_beat=(WHITEBOX,),
                description="PGD through the dense stand-in of every top-k layer"))
register(Attack("bpda_soft", _soft, Role.BPDA, config=BpdaSoftBudget, cascadable=True, must_not_beat=(WHITEBOX,),
                description="PGD through a soft relaxation of every top-k layer's selection"))
