"""The gradient-free attack that broke k-winners-take-all (Tramèr, Carlini, Brendel and Madry, NeurIPS 2020,
"On Adaptive Attacks to Adversarial Example Defenses", code ``wielandbrendel/adaptive_attacks_paper``,
notebook ``01_kwta``).

A top-k forward pass is discontinuous, so its autograd gradient can describe the loss badly. This attack
uses no backpropagation: it estimates the gradient of the logit margin by paired Gaussian finite
differences at scale ``sigma``, which describe a *smoothed* loss, and takes signed steps along the estimate:

    g = sum_i (L(x + sigma u_i) - L(x - sigma u_i)) u_i,   u_i ~ N(0, I),   x <- proj(x + step * sign(g))

with L = max_{j != y} z_j - z_y (ascended). An example stops as soon as it is misclassified.

It needs forward passes only, so the perturbed copies of every still-active example are stacked into
forward calls of at most ``max_batch`` inputs (the memory bound).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from .common import attack_mode, check_inputs
from .gradient import attack_loss

# The reference's schedule: 100 samples for iterations 0-19, 1,000 for 20-39, 20,000 from 40 on.
PAPER_SAMPLES = ((0, 100), (20, 1000), (40, 20000))
PAPER_STEPS = 100
PAPER_STEP_SIZE = 0.01
PAPER_SIGMA = 8 / 255

Schedule = Union[int, Sequence[Sequence[int]]]


def sample_schedule(samples: Schedule) -> list[tuple[int, int]]:
    """``samples`` as sorted ``[(first iteration, samples per step), ...]`` starting at iteration 0.

    An int is a constant schedule; a list of ``[from_iteration, samples]`` pairs switches at each
    ``from_iteration`` (the reference: ``[[0, 100], [20, 1000], [40, 20000]]``).
    """
    if isinstance(samples, int) and not isinstance(samples, bool):
        pairs = [(0, samples)]
    else:
        try:
            pairs = sorted((int(start), int(count)) for start, count in samples)
        except (TypeError, ValueError):
            raise ValueError(f"samples: expected an int or a list of [from_iteration, samples] pairs, "
                             f"got {samples!r}") from None
    if not pairs or pairs[0][0] != 0 or any(count < 1 for _, count in pairs):
        raise ValueError(f"samples: the schedule must start at iteration 0 and use >= 1 sample per step, "
                         f"got {samples!r}")
    return pairs


def samples_at(schedule: list[tuple[int, int]], iteration: int) -> int:
    return [count for start, count in schedule if start <= iteration][-1]


def estimate_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float, samples: int,
                      max_batch: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Paired finite-difference estimate of the margin loss's input gradient, one per example of ``x``.

    The ``len(x) * samples`` pairs are laid out example-major and cut into forward calls of at most
    ``max_batch`` inputs (each pair is two inputs). Unnormalised: only its direction and sign are used.
    """
    grad = torch.zeros_like(x)
    pairs_per_call = max(1, max_batch // 2)
    total = x.shape[0] * samples
    gen_device = generator.device if generator is not None else x.device
    for begin in range(0, total, pairs_per_call):
        example = torch.arange(begin, min(begin + pairs_per_call, total), device=x.device) // samples
        noise = torch.randn((example.shape[0], *x.shape[1:]), generator=generator, device=gen_device,
                            dtype=x.dtype).to(x.device)
        centre, labels = x[example], y[example]
        losses = attack_loss(model(torch.cat([centre + sigma * noise, centre - sigma * noise])),
                             labels.repeat(2), "margin")
        difference = losses[:example.shape[0]] - losses[example.shape[0]:]
        grad.index_add_(0, example, difference.view(-1, *([1] * (x.dim() - 1))) * noise)
    return grad


def zeroth_order(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = PAPER_STEPS,
                 step_size: float = PAPER_STEP_SIZE, sigma: float = PAPER_SIGMA,
                 samples: Schedule = PAPER_SAMPLES, max_batch: int = 1024,
                 generator: Optional[torch.Generator] = None, trace: Optional[list] = None) -> torch.Tensor:
    """L-inf attack on gradient estimates from forward passes only (Tramèr et al. 2020's k-WTA attack).

    ``eps``, ``step_size`` and ``sigma`` are fractions of 1; ``samples`` is the number of noise pairs per
    step, an int or a schedule (see :func:`sample_schedule`; the default is the reference's). It starts at
    ``x`` (no random start, no restarts), takes up to ``steps`` sign steps projected onto the eps-ball and
    [0, 1], and freezes each example once the model misclassifies it. ``max_batch`` bounds the inputs of one
    forward call; ``generator`` draws the noise. Returns adversarial images on the model's device.
    ``trace``, a list, receives one ``{"loss": (B,), "fooled": (B,)}`` record per iterate.
    """
    check_inputs(x, y, eps)
    schedule = sample_schedule(samples)
    if int(steps) != steps or steps < 0 or step_size < 0 or sigma <= 0 or max_batch < 2:
        raise ValueError(f"steps, step_size, sigma and max_batch: expected an integer steps >= 0, step_size >= 0, "
                         f"sigma > 0 and max_batch >= 2, got {steps}, {step_size}, {sigma} and {max_batch}")
    with attack_mode(model) as device, torch.no_grad():
        x = x.detach().to(device)
        y = y.to(device)
        low, high = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
        x_adv = x.clone()
        logits = model(x_adv)
        loss, fooled = attack_loss(logits, y, "margin"), logits.argmax(1) != y
        for iteration in range(steps + 1):
            if trace is not None:
                trace.append({"loss": loss.cpu(), "fooled": fooled.cpu()})
            active = (~fooled).nonzero().squeeze(1)
            if iteration == steps or active.numel() == 0 or eps == 0:
                break
            grad = estimate_gradient(model, x_adv[active], y[active], sigma, samples_at(schedule, iteration),
                                     max_batch, generator)
            moved = torch.max(torch.min(x_adv[active] + step_size * grad.sign(), high[active]), low[active])
            x_adv[active] = moved
            logits = model(moved)
            loss[active] = attack_loss(logits, y[active], "margin")
            fooled[active] = logits.argmax(1) != y[active]
        return x_adv
