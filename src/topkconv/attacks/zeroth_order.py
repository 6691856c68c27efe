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

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .common import attack_mode, check_inputs, trace_for
from .gradient import attack_loss
from .registry import WHITEBOX, Attack, PlanContext, Planned, Role, budget_field, reference_share, register

# The reference's schedule in antithetic PAIRS per step: its notebook draws 100, 1,000 and 20,000 "samples"
# for iterations 0-19, 20-39 and 40 on, and loops over samples // 2 pairs (x + sigma u, x - sigma u).
PAPER_SAMPLES = ((0, 50), (20, 500), (40, 10000))
PAPER_STEPS = 100
PAPER_STEP_SIZE = 0.01
PAPER_SIGMA = 8 / 255
# Inputs per forward call: the quick models' queries ran 1.3-1.6x faster on a CPU than in calls of 1,024 (a call's
# activations stay in cache; benchmarks/bench_queries.py, BENCHMARKS.md); a GPU may want larger calls.
QUERY_BATCH = 256
# Named schedules for the [attack.zeroth_order] budget: the reference's, and twice it (this project's
# "reference" before it counted pairs: 100 / 1,000 / 20,000 pairs per step).
SCHEDULES = {"reference": [list(pair) for pair in PAPER_SAMPLES],
             "reference-2x": [[0, 100], [20, 1000], [40, 20000]]}

Schedule = Union[int, str, Sequence[Sequence[int]]]


def sample_schedule(samples: Schedule) -> list[tuple[int, int]]:
    """``samples`` as sorted ``[(first iteration, samples per step), ...]`` starting at iteration 0.

    An int is a constant schedule; a list of ``[from_iteration, samples]`` pairs switches at each
    ``from_iteration`` (the reference: ``[[0, 50], [20, 500], [40, 10000]]`` pairs); a name of
    :data:`SCHEDULES` is that schedule.
    """
    if isinstance(samples, str):
        if samples not in SCHEDULES:
            raise ValueError(f"samples: expected a schedule name among {', '.join(SCHEDULES)}, an int or a list "
                             f"of [from_iteration, pairs], got {samples!r}")
        samples = SCHEDULES[samples]
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


def total_pairs(samples: Schedule, steps: int) -> int:
    """The antithetic pairs ``steps`` steps of schedule ``samples`` draw in all, per example."""
    schedule = sample_schedule(samples)
    return sum(samples_at(schedule, step) for step in range(steps))


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
                 samples: Schedule = PAPER_SAMPLES, max_batch: int = QUERY_BATCH,
                 generator: Optional[torch.Generator] = None, trace: Optional[list] = None) -> torch.Tensor:
    """L-inf attack on gradient estimates from forward passes only (Tramèr et al. 2020's k-WTA attack).

    ``eps``, ``step_size`` and ``sigma`` are fractions of 1; ``samples`` is the number of noise pairs per
    step, an int or a schedule (see :func:`sample_schedule`; the default is the reference's). It starts at
    ``x`` (no random start, no restarts), takes up to ``steps`` sign steps projected onto the eps-ball and
    [0, 1], and freezes each example once the model misclassifies it. ``max_batch`` bounds the inputs of one
    forward call; ``generator`` draws the noise. Returns adversarial images on the model's device.
    ``trace``, a list, receives one ``{"loss": (B,), "fooled": (B,)}`` record per iterate (inside
    :func:`.common.recording_traces`, a new trace of the block does when none is given).
    """
    check_inputs(x, y, eps)
    schedule = sample_schedule(samples)
    if int(steps) != steps or steps < 0 or step_size < 0 or sigma <= 0 or max_batch < 2:
        raise ValueError(f"steps, step_size, sigma and max_batch: expected an integer steps >= 0, step_size >= 0, "
                         f"sigma > 0 and max_batch >= 2, got {steps}, {step_size}, {sigma} and {max_batch}")
    trace = trace_for(trace)
    with attack_mode(model, fast_queries=True) as device, torch.inference_mode():
        x = x.detach().to(device)
        y = y.to(device)
        low, high = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
        x_adv = x.clone()
        logits = model(x_adv)
        loss, fooled = attack_loss(logits, y, "margin"), logits.argmax(1) != y
        for iteration in range(steps + 1):
            if trace is not None:
                # copies: both are updated in place below (and .cpu() of a CPU tensor is that tensor)
                trace.append({"loss": loss.clone().cpu(), "fooled": fooled.clone().cpu()})
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
    return x_adv.clone()  # out of inference mode: a plain tensor the caller may modify or differentiate


@dataclass
class ZerothOrderBudget:
    steps: int = budget_field(default=PAPER_STEPS, flag="--zo-steps", minimum=0,
                              help="zeroth-order attack steps (0 = skip it)")
    step_size: float = budget_field(default=2.55, flag="--zo-step-size", positive=True,
                                    help="its sign step, 0-255 units (the reference's 0.01)")
    sigma: float = budget_field(default=8.0, flag="--zo-sigma", positive=True,
                                help="its finite-difference scale, 0-255 units")
    samples: Union[str, list] = budget_field(default="reference", flag="--zo-samples", parse="sample_schedule",
                                             metavar="FROM:PAIRS",
                                             help="its noise pairs per step from a step on (FROM:PAIRS ...), or a "
                                                  "schedule name: " + ", ".join(SCHEDULES))
    max_batch: int = budget_field(default=QUERY_BATCH, flag="--zo-max-batch", minimum=2,
                                  help="inputs per forward call of it")
    examples: Optional[int] = budget_field(default=None, flag="--zo-examples", minimum=1,
                                           help="attack only the first N examples with it (unset: all)")

    def reference_fraction(self) -> dict:
        """Antithetic pairs over all steps against the reference's (Tramer et al. 2020's notebook: 100 steps of
        50, 500 then 10,000 pairs: 611,000 pairs); a limit on the examples is below the reference too."""
        return reference_share(total_pairs(self.samples, self.steps), total_pairs(SCHEDULES["reference"], PAPER_STEPS),
                               "Tramer et al. 2020: 100 steps x 50/500/10,000 pairs", complete=self.examples is None)


def reference_budget() -> dict:
    """The ``[attack.zeroth_order]`` table of the reference budget (its fields' defaults, no limit on the examples;
    the forward calls' size, a memory bound, left as the spec has it), as a spec's override (``topkconv reproduce
    --zo-reference``)."""
    return {key: value for key, value in dataclasses.asdict(ZerothOrderBudget()).items() if key != "max_batch"}


def _plan(ctx: PlanContext, eps: float) -> Planned:
    budget = ctx.budget("zeroth_order")
    params = {"eps": eps, "steps": budget.steps, "step_size": budget.step_size, "sigma": budget.sigma,
              "samples": budget.samples, "max_batch": budget.max_batch, "start": "zero"}
    if budget.examples is not None:
        params["examples"] = budget.examples
    return Planned(params, lambda x, y, generator, seed: zeroth_order(
        ctx.model, x, y, eps / 255, steps=budget.steps, step_size=budget.step_size / 255, sigma=budget.sigma / 255,
        samples=budget.samples, max_batch=budget.max_batch, generator=generator), examples=budget.examples)


register(Attack("zeroth_order", _plan, Role.GRADIENT_FREE, config=ZerothOrderBudget, cascadable=True,
                must_not_beat=(WHITEBOX,), applies=lambda ctx: ctx.budget("zeroth_order").steps > 0,
                description="finite-difference sign steps on the logit margin (Tramer et al. 2020's k-WTA break)"))
