"""White-box gradient attacks of the paper's protocol: FGSM and L-inf PGD (restarts, EOT, targeted).

Both run batched on the model's device with no host round-trip inside the step loop: success per
example is tracked with tensor ops, so one PGD step costs one forward and one input-gradient
backward (see benchmarks/bench_attacks.py for the measured overhead).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .common import attack_mode, check_inputs

LOSSES = ("ce", "margin")
STARTS = ("random", "zero")


def attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: str = "ce", targeted: bool = False) -> torch.Tensor:
    """Per-example loss that the attacker *ascends*.

    ``ce``: cross-entropy of the true label (untargeted) or minus that of the target (targeted).
    ``margin``: Carlini-Wagner margin, best other logit minus the label's logit (negated when targeted);
    it does not saturate on confident models, where the softmax of ``ce`` underflows to a zero gradient.
    """
    if loss == "ce":
        value = F.cross_entropy(logits, y, reduction="none")
        return -value if targeted else value
    if loss == "margin":
        label_logit = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
        return label_logit - others if targeted else others - label_logit
    raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = "ce",
                   targeted: bool = False, eot_samples: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the summed attack loss w.r.t. ``x`` and the logits, both averaged over ``eot_samples``
    draws of the model's randomness (Expectation over Transformation; one draw for a deterministic model).

    Only the input gradient is requested, so autograd skips the weight gradients.
    """
    grad, logits_sum = None, None
    for _ in range(eot_samples):
        x_var = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x_var)
            value = (F.cross_entropy(logits, y, reduction="sum") if loss == "ce" and not targeted
                     else attack_loss(logits, y, loss, targeted).sum())  # one kernel for the common case
            # A model that cuts the graph (e.g. one that detaches its input) has a zero gradient; that is
            # gradient masking for the checks to report, not an error.
            draw = torch.autograd.grad(value, x_var)[0] if value.requires_grad else torch.zeros_like(x)
        logits = logits.detach()
        grad = draw if grad is None else grad.add_(draw)
        logits_sum = logits if logits_sum is None else logits_sum.add_(logits)
    if eot_samples == 1:
        return grad, logits_sum
    return grad.div_(eot_samples), logits_sum.div_(eot_samples)


def _fooled(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    labels = logits.argmax(1)
    return labels == y if targeted else labels != y


def _per_example(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, loss: str = "ce",
         targeted: bool = False) -> torch.Tensor:
    """Fast Gradient Sign Method: one step of size ``eps`` (a fraction of 1) along the gradient's sign.

    Returns adversarial images in [0, 1] on the model's device; ``y`` are target labels when ``targeted``.
    """
    check_inputs(x, y, eps)
    _check_loss(loss)
    with attack_mode(model) as device:
        x = x.detach().to(device)
        y = y.to(device)
        grad, _ = input_gradient(model, x, y, loss, targeted)
        return (x + eps * grad.sign()).clamp(0.0, 1.0).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
        start: str = "random", restarts: int = 1, eot_samples: int = 1, loss: str = "ce",
        targeted: bool = False, generator: Optional[torch.Generator] = None,
        trace: Optional[list] = None) -> torch.Tensor:
    """L-inf projected gradient descent (Madry et al. 2018); ``eps`` and ``step_size`` are fractions of 1.

    ``start="random"`` starts every restart uniformly in the eps-ball; ``start="zero"`` starts the first
    restart at ``x`` itself (the paper's reading of PGD, which spends no travel budget on the start) and
    any further restart at random. Each restart takes ``steps`` signed-gradient steps, each projected onto
    the eps-ball and [0, 1]. ``eot_samples`` > 1 averages the gradient over draws of a stochastic model
    (EOT). Per example, the first iterate that fools the model (across all restarts) is returned; examples
    never fooled get the last iterate. ``generator`` draws the random starts (pass one on the model's
    device, or a CPU one, for reproducible results). ``trace``, a list, receives one
    ``{"loss": (B,), "fooled": (B,)}`` record (CPU tensors) per iterate, for the masking indicators.
    """
    check_inputs(x, y, eps)
    _check_loss(loss)
    if start not in STARTS:
        raise ValueError(f"start: expected one of {STARTS}, got {start!r}")
    if step_size < 0 or int(steps) != steps or steps < 0:
        raise ValueError(f"step_size and steps: expected step_size >= 0 and an integer steps >= 0, "
                         f"got {step_size} and {steps}")
    if restarts < 1 or eot_samples < 1:
        raise ValueError(f"restarts and eot_samples: expected integers >= 1, got {restarts} and {eot_samples}")
    with attack_mode(model) as device:
        x = x.detach().to(device)
        y = y.to(device)
        low, high = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
        best = x.clone()
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=device)
        x_adv = x
        for restart in range(restarts):
            x_adv = x.clone()
            if (start == "random" or restart > 0) and eps > 0:
                gen_device = generator.device if generator is not None else device
                noise = torch.rand(x.shape, generator=generator, device=gen_device, dtype=x.dtype)
                x_adv = torch.clamp(x + (2 * noise.to(device) - 1) * eps, low, high)
            for step in range(steps + 1):
                if step < steps:
                    grad, logits = input_gradient(model, x_adv, y, loss, targeted, eot_samples)
                else:  # the last iterate still needs judging; a forward pass suffices
                    with torch.no_grad():
                        logits = model(x_adv)
                fooled = _fooled(logits, y, targeted)
                if trace is not None:
                    trace.append({"loss": attack_loss(logits, y, loss, targeted).cpu(), "fooled": fooled.cpu()})
                best = torch.where(_per_example(fooled > found, x), x_adv, best)  # newly fooled
                found |= fooled
                if step < steps:
                    x_adv = torch.clamp(x_adv.add(grad.sign_(), alpha=step_size), low, high)
        return torch.where(_per_example(found, x), best, x_adv).detach()
