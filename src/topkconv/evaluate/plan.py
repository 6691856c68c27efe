"""Plan: which attacks run on this model, at which eps, with which budget (read from the attack registry).

The paper suite's attacks run at the main eps and at each of ``extra_eps``; the full suite's others at the
main eps; the curve attack at each point of ``eps_curve``. A BPDA or EOT attack runs only on a model that
calls for it (:class:`ModelTraits`); every other rule comes from the entries' fields (see
:mod:`topkconv.attacks.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..attacks import registry
from ..attacks.common import logit_change
from ..attacks.registry import ADAPTIVE_ROLES, Attack, PlanContext, Role
from ..config import AttackConfig, IndicatorConfig


@dataclass(frozen=True)
class ModelTraits:
    stochastic: bool
    routing: bool
    adaptive: tuple   # registry names of the adaptive attacks (BPDA, EOT) the model calls for


@dataclass
class PlannedAttack:
    name: str                         # the reported row: the registry name, "@eps" away from the main eps
    eps: float                        # 0-255 units
    params: dict                      # as reported, 0-255 units
    run: registry.RunFunction         # (x, y, generator, seed) -> x_adv
    entry: Attack
    examples: Optional[int] = None    # attack only the first N examples (the others are left clean)
    cascade: bool = False             # attack only the survivors of the reference attacks at the main eps


@dataclass
class CombinedAttack:
    """A reported row that is the per-example worst of attacks that ran (an example is robust only if it
    survives each of ``parts``): the paper's "PGD" is the worst of the zero and the random start."""
    name: str
    eps: float
    parts: tuple


@dataclass
class Plan:
    attacks: list
    combined: list
    curve: list = field(default_factory=list)   # [(eps, row name)]
    eps: float = 8.0
    draws: int = 0     # a random model: judge every attack's final examples over this many draws (0: once)

    def at_main_eps(self) -> list:
        return [a for a in self.attacks if a.eps == self.eps]

    def cascade_base(self) -> tuple:
        """The white-box reference attacks at the main eps, whose survivors a cascaded attack runs on (a cascaded
        white-box attack, such as AutoAttack at its reference budget in a verdict preset, is not one of them)."""
        return tuple(a.name for a in self.at_main_eps() if a.entry.reference and not a.cascade)

    def reference_rows(self) -> list:
        """The paper suite's white-box reference rows at the main eps (combined rows replace their parts),
        the rows the verdict compares the weaker attacks with: ``["pgd", "eot_pgd"]``."""
        rows = []
        for attack in self.at_main_eps():
            if attack.entry.reference and attack.entry.suite == "paper":
                row = attack.entry.row or attack.name
                rows += [row] if row not in rows else []
        return rows

    def whitebox_row(self) -> str:
        """The white-box row the checks compare with: the EOT attack's on a random model, else the paper's."""
        rows = self.reference_rows()
        eot = [row for row in rows if registry.REGISTRY.get(row) and registry.REGISTRY[row].role == Role.EOT]
        return (eot or rows or ["pgd"])[0]


def model_traits(model: nn.Module, x_probe: torch.Tensor, settings: Optional[IndicatorConfig] = None) -> ModelTraits:
    """What the model is, for the plan: routing, random, and the adaptive attacks it calls for: those its
    defences name (by registry name), and the EOT attacks when its forward pass is random, by its layers or
    on ``x_probe`` (the randomness test of :func:`topkconv.attacks.common.logit_change`)."""
    from .. import defenses

    settings = settings or IndicatorConfig()
    adaptive = tuple(defenses.adaptive_attacks(model))
    for name in adaptive:
        if name not in registry.REGISTRY or registry.REGISTRY[name].role not in ADAPTIVE_ROLES:
            raise ValueError(f"a defence in the model names adaptive attack {name!r}; expected a registered BPDA "
                             f"or EOT attack: {', '.join(registry.with_role(*ADAPTIVE_ROLES))}")
    stochastic = defenses.is_stochastic(model)
    if not stochastic and x_probe.numel():
        change = logit_change(model, x_probe[:settings.probe_examples], settings.probe_passes)
        stochastic = change > settings.randomness_threshold
    if stochastic:
        adaptive += tuple(name for name in registry.with_role(Role.EOT) if name not in adaptive)
    return ModelTraits(stochastic, defenses.has_routing(model), adaptive)


def _fmt(eps: float) -> str:
    return f"{eps:g}"


def _runs(entry: Attack, ctx: PlanContext) -> bool:
    if entry.role in ADAPTIVE_ROLES and entry.name not in ctx.traits.adaptive:
        return False
    return entry.applies is None or entry.applies(ctx)


def _planned(entry: Attack, ctx: PlanContext, eps: float, name: str) -> PlannedAttack:
    made = entry.make(ctx, eps)
    return PlannedAttack(name, eps, made.params, made.run, entry, made.examples)


def check_config(cfg: AttackConfig) -> None:
    if cfg.suite not in registry.SUITES:
        raise ValueError(f"suite: expected one of {registry.SUITES}, got {cfg.suite!r}")
    if not 0 <= cfg.eps <= 255 or any(not 0 <= e <= 255 for e in list(cfg.extra_eps) + list(cfg.eps_curve)):
        raise ValueError(f"eps, extra_eps and eps_curve are in 0-255 units, got {cfg.eps}, {cfg.extra_eps}, "
                         f"{cfg.eps_curve}")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {cfg.batch_size}")
    unknown = sorted(set(cfg.cascade_attacks) - set(registry.cascadable()))
    if unknown:
        raise ValueError(f"cascade_attacks: expected names among {tuple(registry.cascadable())}, got {unknown}")


def _at_each_eps(ctx: PlanContext, entries: list) -> tuple[list, list]:
    """The paper suite's attacks at the main eps and at each extra eps, and their combined rows."""
    cfg, attacks, combined = ctx.cfg, [], []
    for eps in [cfg.eps] + [e for e in cfg.extra_eps if e != cfg.eps]:
        suffix = "" if eps == cfg.eps else f"@{_fmt(eps)}"
        planned = [_planned(entry, ctx, eps, entry.name + suffix) for entry in entries]
        attacks += planned
        for row in dict.fromkeys(a.entry.row for a in planned if a.entry.row):
            parts = tuple(a.name for a in planned if a.entry.row == row)
            combined.append(CombinedAttack(row + suffix, eps, parts))
    return attacks, combined


def _curve(ctx: PlanContext, plan: Plan) -> None:
    """The accuracy-vs-eps curve: clean at 0, the white-box row at the main eps, the curve attack elsewhere."""
    drawers = [e for e in registry.REGISTRY.values() if e.curve and _runs(e, ctx)]
    drawer = next((e for e in drawers if e.role == Role.EOT), drawers[0] if drawers else None)
    names = {a.name for a in plan.attacks}
    for point in sorted(set(ctx.cfg.eps_curve) | {ctx.cfg.eps}):
        if point == 0:
            plan.curve.append((0.0, "clean"))
        elif point == ctx.cfg.eps:
            plan.curve.append((point, plan.whitebox_row()))
        elif drawer is not None:
            name = f"{drawer.name}@{_fmt(point)}"
            if name not in names:
                plan.attacks.append(_planned(drawer, ctx, point, name))
            plan.curve.append((point, name))


def plan_attacks(model: nn.Module, cfg: AttackConfig, traits: ModelTraits,
                 surrogate: Optional[nn.Module] = None) -> Plan:
    """The attacks of ``cfg.suite`` for this model, their combined rows and the eps curve."""
    check_config(cfg)
    ctx = PlanContext(model, cfg, traits, surrogate)
    entries = [entry for entry in registry.suite_attacks(cfg.suite) if _runs(entry, ctx)]
    attacks, combined = _at_each_eps(ctx, [e for e in entries if e.suite == "paper"])
    attacks += [_planned(entry, ctx, cfg.eps, entry.name) for entry in entries if entry.suite != "paper"]
    plan = Plan(attacks, combined, eps=cfg.eps,
                draws=cfg.budget("eot_pgd").evaluation_draws if traits.stochastic else 0)
    if cfg.suite == "full":
        _curve(ctx, plan)
    for attack in plan.attacks:
        attack.cascade = attack.name in cfg.cascade_attacks and attack.eps == cfg.eps
    plan.attacks.sort(key=lambda attack: attack.cascade)   # cascaded ones last, once the survivors are known
    return plan
