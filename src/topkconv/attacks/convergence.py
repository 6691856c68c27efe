"""PGD with doubled steps and with doubled restarts: neither may move the random-start PGD's accuracy by
more than the tolerance (Carlini et al. 2019: more steps or restarts do not change a converged result)."""

from __future__ import annotations

from .pgd import plan_pgd
from .registry import Attack, Role, register

register(Attack("pgd_2x_steps", lambda ctx, eps: plan_pgd(ctx, eps, "random", steps=2 * ctx.budget("pgd").steps),
                Role.WHITEBOX, variant_of="pgd_random", description="PGD from a random start, twice the steps"))
register(Attack("pgd_2x_restarts",
                lambda ctx, eps: plan_pgd(ctx, eps, "random", restarts=2 * ctx.budget("pgd").restarts),
                Role.WHITEBOX, variant_of="pgd_random", description="PGD from a random start, twice the restarts"))
