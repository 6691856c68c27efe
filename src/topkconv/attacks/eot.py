"""EOT-PGD: PGD with each gradient averaged over draws of a random model's randomness (Athalye et al. 2018).

Without EOT a randomised defence looks stronger than it is. It runs on models that call for it: a defence
naming ``eot_pgd``, or a forward pass found random on a probe.
"""

from __future__ import annotations

from dataclasses import dataclass

from .pgd import plan_pgd
from .registry import Attack, PlanContext, Planned, Role, budget_field, reference_share, register


REFERENCE_SAMPLES = 20   # AutoAttack's rand version (Croce and Hein 2020): EOT over 20 draws


@dataclass
class EotBudget:
    samples: int = budget_field(default=20, flag="--eot-samples", minimum=1,
                                help="EOT draws per gradient for stochastic models (also AutoAttack rand's)")
    # On a random model every attack's adversarial examples (and the clean ones) are judged over this many draws
    # of its randomness: the expected accuracy over draws is the headline, the worst over draws beside it.
    evaluation_draws: int = budget_field(default=10, flag="--evaluation-draws", minimum=10,
                                         help="draws of a random model over which every attack's final examples "
                                              "are judged")

    def __post_init__(self):
        if not isinstance(self.evaluation_draws, int) or self.evaluation_draws < 10:
            raise ValueError(f"attack.eot_pgd.evaluation_draws: expected an integer >= 10 (one draw judges a random "
                             f"model by its luck), got {self.evaluation_draws!r}")

    def reference_fraction(self) -> dict:
        return reference_share(self.samples, REFERENCE_SAMPLES, "AutoAttack's rand version: 20 EOT draws")


def _plan(ctx: PlanContext, eps: float) -> Planned:
    return plan_pgd(ctx, eps, "random", eot=ctx.budget("eot_pgd").samples)


register(Attack("eot_pgd", _plan, Role.EOT, config=EotBudget, suite="paper", curve=True,
                description="PGD on the gradient averaged over draws of the model's randomness"))
