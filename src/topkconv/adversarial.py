"""Adversarial training, the positive control: a model known to be robust, on which the attacks' and the
indicators' verdicts can be checked.

``train.adversarial`` (:class:`~topkconv.config.AdversarialConfig`; radii in 0-255 units, as in
``[attack]``) picks the method; :func:`training_loss` is what :func:`topkconv.train.train_one_epoch` minimises.

* ``pgd`` (Madry et al., ICLR 2018): cross-entropy on L-inf PGD examples; PGD ascends the cross-entropy
  from a uniform random start in the eps-ball, ``steps`` signed steps of ``step_size`` (default
  2.5 * eps / steps), each projected onto the eps-ball and [0, 1].
* ``trades`` (Zhang et al., ICML 2019): CE(clean) + beta * KL(p(clean) || p(adversarial)), where the inner
  maximisation ascends that KL from ``x + 0.001 * N(0, 1)`` (their reference code; the KL's gradient is 0
  at ``x`` itself).
* ``fgsm`` (Wong, Rice and Kolter, ICLR 2020, "fast" adversarial training): one signed step of
  ``step_size`` (default 1.25 * eps) from a uniform random start, projected.

Choices:

* **The examples are crafted with the model in eval mode** (every module's mode is restored after), as
  the TRADES reference does (``model.eval()`` for the inner maximisation, then ``model.train()``): the
  attacker's forward passes then neither update the BatchNorm running statistics nor draw dropout masks,
  and the examples attack the function that is evaluated. The training step itself runs in train mode.
* The inner maximisation runs on the plain model (not the DDP wrapper: each process crafts its own share,
  no gradients are synchronised) and in float32 (outside autocast). Its random starts draw from torch's
  global generator, which the trainer reseeds every epoch, so a resumed run gives the same weights.
* TRADES' clean and adversarial batches go through the model in one forward pass (concatenated), so one
  step is one forward and one backward, as DDP expects.
* The training accuracy reported for an adversarial run is the accuracy on the adversarial examples.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attacks.common import attack_mode
from .attacks import pgd  # the function (the attacks package re-exports it wherever its module lives)
from .config import AdversarialConfig

# Madry et al.'s rule of thumb for the PGD step: the steps together travel 2.5 times the radius, so a
# random start anywhere in the ball can still reach the far side.
PGD_TRAVEL = 2.5
FGSM_STEP = 1.25      # Wong et al.: one step of 1.25 * eps from a random start
TRADES_START_STD = 0.001
CHECK_STEPS = 10      # the per-epoch robustness check: PGD-10 at the training radius


def step_size(cfg: AdversarialConfig) -> float:
    """The inner step as a fraction of 1 (the config holds 0-255 units)."""
    if cfg.step_size is not None:
        return cfg.step_size / 255
    if cfg.method == "fgsm":
        return FGSM_STEP * cfg.eps / 255
    return PGD_TRAVEL * cfg.eps / 255 / cfg.steps


def _ascend(model: nn.Module, x: torch.Tensor, x_start: torch.Tensor, objective: Callable, eps: float,
            step: float, steps: int) -> torch.Tensor:
    """``steps`` signed-gradient steps that raise ``objective(logits)`` (a scalar), projected onto the
    eps-ball around ``x`` and [0, 1]; the model's modes are left to the caller."""
    low, high = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
    x_adv = torch.max(torch.min(x_start, high), low)
    for _ in range(steps):
        x_var = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            value = objective(model(x_var))
            grad = torch.autograd.grad(value, x_var)[0] if value.requires_grad else torch.zeros_like(x_var)
        x_adv = torch.max(torch.min(x_adv + step * grad.sign(), high), low)
    return x_adv.detach()


def craft(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AdversarialConfig) -> torch.Tensor:
    """The training examples of ``cfg.method`` for the batch ``(x, y)`` (images in [0, 1]), crafted in eval
    mode (each module's mode restored afterwards)."""
    if not cfg.enabled:
        raise ValueError("train.adversarial.method is 'none': there are no adversarial examples to craft")
    eps = cfg.eps / 255
    x = x.detach()
    with attack_mode(model), torch.autocast(device_type=x.device.type, enabled=False):
        if cfg.method == "trades":
            with torch.no_grad():
                clean = F.softmax(model(x).float(), dim=1)
            start = x + TRADES_START_STD * torch.randn(x.shape, device=x.device, dtype=x.dtype)
            objective = lambda logits: F.kl_div(F.log_softmax(logits.float(), dim=1), clean, reduction="sum")  # noqa: E731
            return _ascend(model, x, start, objective, eps, step_size(cfg), cfg.steps)
        start = x + (2 * torch.rand(x.shape, device=x.device, dtype=x.dtype) - 1) * eps
        objective = lambda logits: F.cross_entropy(logits.float(), y, reduction="sum")  # noqa: E731
        steps = 1 if cfg.method == "fgsm" else cfg.steps
        return _ascend(model, x, start, objective, eps, step_size(cfg), steps)


def training_loss(model: nn.Module, plain_model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  cfg: AdversarialConfig, criterion: Callable, amp: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, logits on the adversarial examples)`` of one training batch, with ``model`` in train mode.

    ``model`` is what the step differentiates (possibly a DDP wrapper); ``plain_model`` the same network
    unwrapped, which crafts the examples. ``criterion(logits, y)`` is the trainer's cross-entropy.
    """
    x_adv = craft(plain_model, x, y, cfg)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
        if cfg.method != "trades":
            logits = model(x_adv)
            return criterion(logits, y), logits
        clean, adversarial = model(torch.cat([x, x_adv])).split(len(x))
    kl = F.kl_div(F.log_softmax(adversarial.float(), dim=1), F.softmax(clean.float(), dim=1), reduction="batchmean")
    return criterion(clean, y) + cfg.beta * kl, adversarial


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AdversarialConfig,
                    batch_size: int = 256, seed: int = 0) -> Optional[float]:
    """Accuracy under PGD-10 (random start, step 2.5 * eps / 10) at the training radius on ``(x, y)``: the
    check that catches catastrophic overfitting. None when there are no examples."""
    if len(y) == 0:
        return None
    generator = torch.Generator().manual_seed(seed)
    eps = cfg.eps / 255
    correct = 0
    with attack_mode(model) as device:
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            x_adv = pgd(model, xb, yb, eps, PGD_TRAVEL * eps / CHECK_STEPS, CHECK_STEPS, generator=generator)
            with torch.no_grad():
                correct += int((model(x_adv).argmax(1) == yb.to(device)).sum())
    return correct / len(y)
