"""Transfer attack: PGD crafted on a surrogate (the undefended baseline), then shown to the defended model.

If these examples fool the defence more often than white-box PGD on the defence itself, the defence's
own gradients are uninformative: a sign of gradient masking (Athalye et al. 2018). It reads the
``[attack.pgd]`` budget and runs when the evaluation is given a surrogate.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .common import model_device
from .pgd import pgd
from .registry import WHITEBOX, Attack, PlanContext, Planned, Role, register


def transfer(surrogate: nn.Module, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
             step_size: float, steps: int, start: str = "random", restarts: int = 1, loss: str = "ce",
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Adversarial images crafted by :func:`pgd` on ``surrogate``, returned on ``model``'s device."""
    x_adv = pgd(surrogate, x, y, eps, step_size, steps, start=start, restarts=restarts,
                loss=loss, generator=generator)
    return x_adv.to(model_device(model))


def _plan(ctx: PlanContext, eps: float) -> Planned:
    from .pgd import step_at

    step, steps = step_at(ctx, eps), ctx.budget("pgd").steps
    return Planned({"eps": eps, "step_size": step, "steps": steps, "surrogate": "pgd"},
                   lambda x, y, generator, seed: transfer(ctx.surrogate, ctx.model, x, y, eps / 255, step / 255,
                                                          steps, generator=generator))


register(Attack("transfer", _plan, Role.TRANSFER, cascadable=True, must_not_beat=(WHITEBOX,),
                applies=lambda ctx: ctx.surrogate is not None,
                description="PGD crafted on the surrogate (--surrogate), shown to the model"))
