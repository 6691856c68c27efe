"""Square Attack (Andriushchenko et al. 2020) through ``pyautoattack``: a score-based black-box attack that uses
the model's outputs only, so gradient masking does not blunt it. It must not beat the white-box attacks
(AutoAttack's flag: by more than 0.2 points)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .autoattack import _isolated_rng
from .common import attack_mode, check_inputs
from .registry import WHITEBOX, Attack, PlanContext, Planned, Role, budget_field, reference_share, register


REFERENCE_QUERIES = 5000   # AutoAttack's Square (Andriushchenko et al. 2020; Croce and Hein 2020)


@dataclass
class SquareBudget:
    queries: int = budget_field(default=5000, flag="--square-queries", minimum=1,
                                help="Square's query budget (5000 = AutoAttack; also AutoAttack's Square)")

    def reference_fraction(self) -> dict:
        return reference_share(self.queries, REFERENCE_QUERIES, "AutoAttack's Square: 5,000 queries")


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, n_queries: int = 5000,
           seed: int = 0, p_init: float = 0.8, loss: str = "margin") -> torch.Tensor:
    """Square Attack (Andriushchenko et al. 2020), a score-based black-box attack: it uses the model's
    outputs only, so gradient masking does not blunt it. ``eps`` is a fraction of 1."""
    check_inputs(x, y, eps)
    if n_queries < 1:
        raise ValueError(f"n_queries: expected >= 1, got {n_queries}")
    from pyautoattack.square import SquareAttack

    with attack_mode(model, fast_queries=True) as device, _isolated_rng(device), torch.inference_mode():
        attack = SquareAttack(model, norm="Linf", n_queries=n_queries, eps=eps, p_init=p_init, n_restarts=1,
                              seed=seed, verbose=False, loss=loss, resc_schedule=True, device=device)
        x_adv = attack.perturb(x.detach().to(device), y.to(device))
    return x_adv.clone()  # out of inference mode: a plain tensor the caller may modify or differentiate


def _plan(ctx: PlanContext, eps: float) -> Planned:
    queries = ctx.budget("square").queries
    return Planned({"eps": eps, "n_queries": queries},
                   lambda x, y, generator, seed: square(ctx.model, x, y, eps / 255, n_queries=queries, seed=seed))


register(Attack("square", _plan, Role.GRADIENT_FREE, config=SquareBudget, cascadable=True,
                must_not_beat=(WHITEBOX,), description="Square, a score-based black-box attack"))
