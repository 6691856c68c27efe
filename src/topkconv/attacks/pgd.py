"""The paper's PGD (16 steps of 0.75/255 at eps = 8/255) from a zero start (``pgd_zero``, the paper's reading)
and from a random start (``pgd_random``); the reported row ``pgd`` is their per-example worst.

Both read the ``[attack.pgd]`` budget, as do the other attacks built on PGD (EOT, BPDA, transfer, the
convergence variants); at a radius other than the main eps the step keeps the main step/eps ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..layers import dense_gradients
from .common import attack_mode, check_inputs, trace_for, uniform_start
from .gradient import attack_loss, check_loss, fooled_by, input_gradient, per_example
from .registry import Attack, PlanContext, Planned, Role, budget_field, reference_share, register

STARTS = ("random", "zero")
KEEPS = ("first", "last")  # which iterate pgd returns per example: the first that fools, or the end
PAPER_STEPS = 16   # the paper's PGD protocol (Table III): 16 steps of 0.75/255 within 8/255


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
        start: str = "random", restarts: int = 1, eot_samples: int = 1, loss: str = "ce",
        targeted: bool = False, generator: Optional[torch.Generator] = None,
        trace: Optional[list] = None, keep: str = "first") -> torch.Tensor:
    """L-inf projected gradient descent (Madry et al. 2018); ``eps`` and ``step_size`` are fractions of 1.

    ``start="random"`` starts every restart uniformly in the eps-ball; ``start="zero"`` starts the first
    restart at ``x`` itself (the paper's reading of PGD, which spends no travel budget on the start) and
    any further restart at random. Each restart takes ``steps`` signed-gradient steps, each projected onto
    the eps-ball and [0, 1]. ``eot_samples`` > 1 averages the gradient over draws of a stochastic model
    (EOT). Per example, the first iterate that fools the model (across all restarts) is returned; examples
    never fooled get the last iterate. ``keep="last"`` judges only each restart's last iterate instead: per
    example the end of the first restart whose end fools it, else the last restart's end (what a transfer
    attack runs to the end of its budget for, see :func:`.bpda.plan_on_stand_in`). ``generator`` draws the random starts (pass one on the model's
    device, or a CPU one, for reproducible results). ``trace``, a list, receives one
    ``{"loss": (B,), "fooled": (B,)}`` record (CPU tensors) per iterate, for the masking indicators (inside
    :func:`.common.recording_traces`, a new trace of the block does when none is given).
    """
    check_inputs(x, y, eps)
    check_loss(loss)
    if start not in STARTS:
        raise ValueError(f"start: expected one of {STARTS}, got {start!r}")
    if step_size < 0 or int(steps) != steps or steps < 0:
        raise ValueError(f"step_size and steps: expected step_size >= 0 and an integer steps >= 0, "
                         f"got {step_size} and {steps}")
    if keep not in KEEPS:
        raise ValueError(f"keep: expected one of {KEEPS}, got {keep!r}")
    if restarts < 1 or eot_samples < 1:
        raise ValueError(f"restarts and eot_samples: expected integers >= 1, got {restarts} and {eot_samples}")
    trace = trace_for(trace)
    with attack_mode(model, fast_queries=True) as device:
        x = x.detach().to(device)
        y = y.to(device)
        low, high = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
        best = x.clone()
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=device)
        x_adv = x
        for restart in range(restarts):
            random_start = (start == "random" or restart > 0) and eps > 0
            x_adv = uniform_start(x, eps, low, high, generator) if random_start else x.clone()
            for step in range(steps + 1):
                if step < steps:
                    grad, logits = input_gradient(model, x_adv, y, loss, targeted, eot_samples)
                else:  # the last iterate still needs judging; a forward pass suffices
                    with torch.no_grad():
                        logits = model(x_adv)
                fooled = fooled_by(logits, y, targeted)
                if trace is not None:
                    trace.append({"loss": attack_loss(logits, y, loss, targeted).cpu(), "fooled": fooled.cpu()})
                judged = fooled if keep == "first" or step == steps else torch.zeros_like(fooled)
                best = torch.where(per_example(judged > found, x), x_adv, best)  # newly fooled
                found |= judged
                if step < steps:
                    x_adv = torch.clamp(x_adv.add(grad.sign_(), alpha=step_size), low, high)
        return torch.where(per_example(found, x), best, x_adv).detach()


@dataclass
class PgdBudget:
    steps: int = budget_field(default=16, flag="--steps", help="PGD steps", minimum=1)
    step_size: float = budget_field(default=0.75, flag="--step-size", positive=True,
                                    help="PGD step in 0-255 units at the main eps (other radii keep the ratio)")
    restarts: int = budget_field(default=1, flag="--restarts", help="PGD random restarts", minimum=1)

    def reference_fraction(self) -> dict:
        """The paper's protocol is PGD's reference: 16 steps, one start. (Its convergence is judged by the doubled
        steps and restarts and by the AutoAttack row, whose reference is APGD's 100 iterations.)"""
        return reference_share(self.steps * self.restarts, PAPER_STEPS, "the paper's PGD: 16 steps x 1 start")


def step_at(ctx: PlanContext, eps: float) -> float:
    """PGD's step (0-255 units) at ``eps``: the budget's at the main eps, the same step/eps ratio elsewhere."""
    budget, main = ctx.budget("pgd"), ctx.cfg.eps
    if eps == main:
        return budget.step_size
    return (budget.step_size / main if main > 0 else 0.0) * eps


def plan_pgd(ctx: PlanContext, eps: float, start: str, steps: Optional[int] = None, restarts: Optional[int] = None,
             eot: int = 1, gradients=None, extra: Optional[dict] = None) -> Planned:
    """PGD on ``ctx.model`` at ``eps`` (0-255 units) with the ``[attack.pgd]`` budget unless given;
    ``gradients`` is a context manager factory for the layers' backward (BPDA), ``extra`` more params."""
    budget = ctx.budget("pgd")
    steps = budget.steps if steps is None else steps
    restarts = budget.restarts if restarts is None else restarts
    step = step_at(ctx, eps)

    def run(x, y, generator, seed):
        # The exact backward unless BPDA asks for a stand-in, even inside a caller's BPDA block.
        with (gradients() if gradients is not None else dense_gradients(False)):
            return pgd(ctx.model, x, y, eps / 255, step / 255, steps, start=start, restarts=restarts,
                       eot_samples=eot, generator=generator)

    params = {"eps": eps, "step_size": step, "steps": steps, "restarts": restarts, "start": start}
    if eot > 1:
        params["eot_samples"] = eot
    params.update(extra or {})
    return Planned(params, run)


register(Attack("pgd_zero", lambda ctx, eps: plan_pgd(ctx, eps, "zero"), Role.WHITEBOX, config=PgdBudget,
                budget="pgd", suite="paper", row="pgd", curve=True,
                description="the paper's PGD from the clean point"))
register(Attack("pgd_random", lambda ctx, eps: plan_pgd(ctx, eps, "random"), Role.WHITEBOX, config=PgdBudget,
                budget="pgd", suite="paper", row="pgd", description="the paper's PGD from a random start"))
