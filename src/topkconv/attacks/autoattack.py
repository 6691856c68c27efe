"""AutoAttack (and, in square.py, Square) through the ``pyautoattack`` package (0.2.0 API: ``attacks=``, ``batch_size=``,
``device`` defaulting to the CPU, and ``run_standard_evaluation`` returning ``(x_adv, y_adv)``).

pyautoattack seeds torch's global generator; the calls here run inside ``torch.random.fork_rng`` so the
caller's random stream is left as it was.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .common import attack_mode, check_inputs
from .registry import Attack, PlanContext, Planned, Role, budget_field, reference_share, register

AA_VERSIONS = ("standard", "rand", "plus")
REFERENCE_ITERATIONS = 100   # AutoAttack's APGD (Croce and Hein 2020)
AA_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
AA_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")   # the standard version's attacks (Croce and Hein 2020)


@dataclass
class AutoAttackBudget:
    iterations: int = budget_field(default=100, flag="--apgd-iters", minimum=1,
                                   help="AutoAttack's APGD/FAB iterations (100 = AutoAttack; fewer = quicker, "
                                        "weaker)")
    attacks: list = budget_field(default=[], metavar="NAME", choices=AA_ATTACKS,
                                 help="run only these AutoAttack attacks (empty: the version's own)")

    def reference_fraction(self) -> dict:
        """AutoAttack's standard budget (Croce and Hein 2020): 100 APGD iterations and all of the version's
        attacks, left to the version or named (``AA_STANDARD``); fewer attacks are below the reference whatever
        their iterations. Square may be left out: the full suite runs it as its own ``square`` row, whose
        budget is judged there (at 5,000 queries it is AutoAttack's), so AutoAttack need not run it twice."""
        return reference_share(self.iterations, REFERENCE_ITERATIONS,
                               "AutoAttack: 100 iterations, all its attacks (Square as the suite's own row)",
                               complete=not self.attacks or set(AA_STANDARD) - {"square"} <= set(self.attacks))


def _isolated_rng(device: torch.device):
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


@contextlib.contextmanager
def _quiet_logger():
    # pyautoattack logs its progress and its sanity warnings at DEBUG/WARNING level on "auto-attack";
    # the evaluation reports its own checks, so keep the console clean unless the user asks.
    logger = logging.getLogger("auto-attack")
    level = logger.level
    if level == logging.NOTSET:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _set_iterations(apgd, n_iter: int) -> None:
    # APGD derives its step-size checkpoints from n_iter in __init__, so they are updated together.
    apgd.n_iter = apgd.n_iter_orig = n_iter
    apgd.n_iter_2 = max(int(0.22 * n_iter), 1)
    apgd.n_iter_min = max(int(0.06 * n_iter), 1)
    apgd.size_decr = max(int(0.03 * n_iter), 1)


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, version: str = "standard",
               attacks: Optional[list] = None, n_iter: int = 100, square_queries: int = 5000,
               seed: int = 0, batch_size: int = 256, eot_iter: Optional[int] = None) -> torch.Tensor:
    """AutoAttack (Croce and Hein 2020), L-inf, ``eps`` a fraction of 1; returns the adversarial images.

    ``version``: ``standard`` (APGD-CE, APGD-T, FAB-T, Square) for deterministic models, ``rand``
    (APGD-CE and APGD-DLR with 20 EOT iterations) for randomised ones. ``attacks`` (a list of
    pyautoattack names such as ``["apgd-ce"]``) runs only those, with the version's parameters. ``n_iter`` and
    ``square_queries`` below the defaults (100 and 5000) give a cheaper, weaker run for quick presets;
    ``eot_iter`` (``rand`` only; None keeps AutoAttack's 20) sets the draws each APGD gradient averages.
    """
    check_inputs(x, y, eps)
    if version not in AA_VERSIONS:
        raise ValueError(f"version: expected one of {AA_VERSIONS}, got {version!r}")
    unknown = sorted(set(attacks or ()) - set(AA_ATTACKS))
    if unknown:
        raise ValueError(f"attacks: unknown AutoAttack attacks {unknown}; expected names from {AA_ATTACKS}")
    if n_iter < 1 or square_queries < 1:
        raise ValueError(f"n_iter and square_queries: expected >= 1, got {n_iter} and {square_queries}")
    if eot_iter is not None and (version != "rand" or eot_iter < 1):
        raise ValueError(f"eot_iter: expected an integer >= 1 with version 'rand', got {eot_iter} with {version!r}")
    from pyautoattack import AutoAttack

    with attack_mode(model, fast_queries=True) as device, _isolated_rng(device), _quiet_logger():
        runner = AutoAttack(model, device=device, eps=eps, norm="Linf", seed=seed, version=version)
        if attacks is not None:  # after the version set its parameters (rand: 20 EOT iterations)
            runner.attacks_to_run = list(attacks)
        runner.verbose = False
        for apgd in (runner.apgd, runner.apgd_targeted):
            _set_iterations(apgd, n_iter)
            if eot_iter is not None:
                apgd.eot_iter = eot_iter
        runner.fab.n_iter = n_iter
        runner.square.n_queries = square_queries
        with torch.no_grad():  # 9 target classes assume 10 or more classes; fewer would index past the logits
            targets = min(9, model(x[:1].to(device)).shape[1] - 1)
        runner.apgd_targeted.n_target_classes = runner.fab.n_target_classes = targets
        x_adv, _ = runner.run_standard_evaluation(x.detach().to(device), y.to(device), batch_size=batch_size)
    return x_adv.detach()


def _plan(ctx: PlanContext, eps: float) -> Planned:
    """The ``standard`` version, or ``rand`` on a random model, whose APGD averages as many draws as
    EOT-PGD does (``[attack.eot_pgd]``; AutoAttack's own: 20). Square's query budget is ``[attack.square]``'s."""
    budget, queries = ctx.budget("autoattack"), ctx.budget("square").queries
    version = "rand" if ctx.traits.stochastic else "standard"
    subset = list(budget.attacks) or None
    eot_iter = ctx.budget("eot_pgd").samples if version == "rand" else None
    params = {"eps": eps, "version": version, "attacks": subset, "n_iter": budget.iterations,
              "square_queries": queries, "eot_iter": eot_iter}
    return Planned(params, lambda x, y, generator, seed: autoattack(
        ctx.model, x, y, eps / 255, version=version, attacks=subset, n_iter=budget.iterations,
        square_queries=queries, seed=seed, batch_size=ctx.cfg.batch_size, eot_iter=eot_iter))


# Cascadable: a verdict preset runs it at its reference budget on the survivors of the other white-box attacks
# only (its own attacks cascade the same way inside it), where on every example it would cost minutes a model.
register(Attack("autoattack", _plan, Role.WHITEBOX, config=AutoAttackBudget, cascadable=True,
                description="AutoAttack (Croce and Hein 2020) via pyautoattack"))
