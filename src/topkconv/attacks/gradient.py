"""What the white-box gradient attacks share: the attack loss and the input gradient (with EOT).

FGSM (fgsm.py) and PGD (pgd.py) run batched on the model's device with no host round-trip inside the step loop: success per
example is tracked with tensor ops, so one PGD step costs one forward and one input-gradient
backward (see benchmarks/bench_attacks.py for the measured overhead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


LOSSES = ("ce", "margin")


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


def fooled_by(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    labels = logits.argmax(1)
    return labels == y if targeted else labels != y


def per_example(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
