"""The masking indicators that run the model (:mod:`topkconv.attacks.indicators`), on the first
``cfg.indicators.examples`` examples, each seeded and timed; rank 0 measures them. Silent success and
incomplete optimisation are read from the reported attacks' own traces instead (:mod:`.judge`)."""

from __future__ import annotations

import time
from typing import Optional

import torch
from torch import nn

from .. import defenses
from ..attacks.bpda import STAND_INS, plan_on_stand_in, stand_in_model
from ..attacks.common import model_device, seeded
from ..attacks.indicators import (baseline_transfer, gradient_agreement, randomness, selection_flip_rate,
                                  surrogate_transfer_failure, unavailable_gradients, unconstrained_failure,
                                  unstable_predictions, zero_gradient_at_start)
from ..attacks.masking import not_applicable
from ..attacks.pgd import pgd, step_at
from ..attacks.registry import PlanContext
from ..attacks.transfer import transfer
from ..config import AttackConfig
from .run import attack_seed, sync


def stand_in_transfer(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig,
                      generator: Optional[torch.Generator] = None) -> dict:
    """:func:`surrogate_transfer_failure` at ``cfg.eps``: each BPDA attack the model's defences call for, with
    its own budget, run on its stand-in model (:func:`.attacks.bpda.plan_on_stand_in`), its points judged on the
    model."""
    ctx = PlanContext(model, cfg)
    stand_ins = {}
    for name in (name for name in defenses.adaptive_attacks(model) if name in STAND_INS):
        x_adv = plan_on_stand_in(ctx, name, cfg.eps).run(x, y, generator, cfg.seed)
        stand_ins[name] = (lambda name=name: stand_in_model(ctx, name), x_adv)
    return surrogate_transfer_failure(model, stand_ins, x, y, cfg.eps / 255,
                                      cfg.indicators.surrogate_transfer_threshold)


def _measures(model: nn.Module, xi: torch.Tensor, yi: torch.Tensor, cfg: AttackConfig,
              surrogate: Optional[nn.Module]) -> dict:
    """``{indicator name: measure(generator) -> result}``."""
    s, eps = cfg.indicators, cfg.eps / 255
    step = 2.5 * eps / max(s.steps, 1)   # Madry et al.'s rule: 2.5 x eps of travel over the steps
    batch = cfg.budget("zeroth_order").max_batch

    def transferred(generator):
        if surrogate is None:
            return not_applicable("needs a surrogate (--surrogate)")
        ctx = PlanContext(model, cfg)
        x_adv = transfer(surrogate, model, xi, yi, eps, step_at(ctx, cfg.eps) / 255, cfg.budget("pgd").steps,
                         generator=generator)
        # read against the indicators' own white-box PGD on the model, on the same examples
        x_whitebox = pgd(model, xi, yi, eps, step, s.steps, start="zero", loss="margin")
        return baseline_transfer(model, surrogate, xi, yi, x_adv, x_whitebox, s.alpha, s.slack_points)

    return {
        "unavailable_gradients": lambda g: unavailable_gradients(model, xi, yi),
        "unstable_predictions": lambda g: unstable_predictions(model, xi, yi, s.unstable_radius / 255, s.draws,
                                                               batch, g, s.unstable_threshold),
        "baseline_transfer": transferred,
        "surrogate_transfer_failure": lambda g: stand_in_transfer(model, xi, yi, cfg, g),
        "unconstrained_failure": lambda g: unconstrained_failure(model, xi, yi, s.steps, g, s.slack_points),
        "randomness": lambda g: randomness(model, xi, s.randomness_passes, s.randomness_threshold),
        "zero_gradient_at_start": lambda g: zero_gradient_at_start(model, xi, yi, eps, g),
        "selection_flip_rate": lambda g: selection_flip_rate(model, xi, s.flip_radius / 255, s.flip_draws, g,
                                                             s.flip_threshold),
        "gradient_agreement": lambda g: gradient_agreement(model, xi, yi, s.agreement_sigma / 255, s.draws, batch,
                                                           g, s.agreement_fraction),
    }


def measure_indicators(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig,
                       surrogate: Optional[nn.Module] = None) -> dict:
    """Every indicator that runs the model, each seeded from ``(cfg.seed, name)`` and timed (``seconds``)."""
    m = min(x.shape[0], cfg.indicators.examples)
    device = model_device(model)
    measures = _measures(model, x[:m].to(device), y[:m].to(device), cfg, surrogate)
    found = {}
    for name, measure in measures.items():
        tic = time.perf_counter()
        with seeded(model, attack_seed(cfg.seed, -1, name)) as generator:
            found[name] = measure(generator)
        sync(device)
        found[name]["seconds"] = time.perf_counter() - tic
    return found
