"""FGSM, the paper's one-step attack: it must not beat the iterative PGD (Athalye et al. 2018's first check)."""

from __future__ import annotations

import torch
from torch import nn

from .common import attack_mode, check_inputs
from .gradient import check_loss, input_gradient
from .registry import Attack, PlanContext, Planned, Role, register


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, loss: str = "ce",
         targeted: bool = False) -> torch.Tensor:
    """Fast Gradient Sign Method: one step of size ``eps`` (a fraction of 1) along the gradient's sign.

    Returns adversarial images in [0, 1] on the model's device; ``y`` are target labels when ``targeted``.
    """
    check_inputs(x, y, eps)
    check_loss(loss)
    with attack_mode(model) as device:
        x = x.detach().to(device)
        y = y.to(device)
        grad, _ = input_gradient(model, x, y, loss, targeted)
        return (x + eps * grad.sign()).clamp(0.0, 1.0).detach()


def _plan(ctx: PlanContext, eps: float) -> Planned:
    return Planned({"eps": eps}, lambda x, y, generator, seed: fgsm(ctx.model, x, y, eps / 255))


register(Attack("fgsm", _plan, Role.WHITEBOX, suite="paper", must_not_beat=("pgd",),
                description="one signed-gradient step of size eps"))
