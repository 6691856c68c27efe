"""The attack registry: one :class:`Attack` entry per attack, read by everything that needs to know one.

The evaluation's plan, the cascade, the masking checks, the verdict, the plot and the CLI's flags all read
:data:`REGISTRY` and the entries' roles; none keeps a list of names. A new attack is one file that calls
:func:`register` plus its import line in ``attacks/__init__.py``.

An entry says:

- ``make(context, eps)``: the attack planned at ``eps`` (0-255 units) for the model of ``context``: its
  reported parameters and a ``run(x, y, generator, seed) -> x_adv`` function;
- ``role``: what kind of attack it is (:class:`Role`); a BPDA stand-in or an EOT attack runs only on a model
  that calls for it (a defence naming it by its registry name, or a random forward pass for EOT);
- ``config`` and ``budget``: its budget dataclass, read from the spec's ``[attack.<budget>]`` table (several
  attacks may read one budget, as the PGD family reads ``[attack.pgd]``);
- ``suite``: ``paper`` (the paper's protocol, run at every reported eps) or ``full`` (the strong suite, at the
  main eps); suites are the lists :func:`suite_attacks` reads from the registry, in registration order;
- ``cascadable``: it may run on the survivors of the white-box reference attacks only;
- ``must_not_beat``: the rows it must not beat (the masking checks and the verdict); :data:`WHITEBOX` is the
  strongest white-box reference row;
- ``row``: attacks sharing a row are also reported as their per-example worst (the paper's "pgd");
- ``variant_of``: a larger budget of that attack, which must not move its accuracy (convergence);
- ``curve``: it draws the accuracy-vs-eps curve (an EOT one when the model calls for EOT);
- ``applies(context)``: whether it runs at all for this model and config (e.g. transfer needs a surrogate).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

WHITEBOX = "whitebox"   # in must_not_beat: the strongest white-box reference row (see the module docstring)


class Role(str, enum.Enum):
    WHITEBOX = "white-box gradient"
    GRADIENT_FREE = "gradient-free"
    TRANSFER = "transfer"
    BPDA = "BPDA stand-in"
    EOT = "stochastic EOT"


ADAPTIVE_ROLES = (Role.BPDA, Role.EOT)   # run only when the model calls for them
REFERENCE_ROLES = (Role.WHITEBOX, Role.EOT)


@dataclass(frozen=True)
class PlanContext:
    """What an attack is planned for: the model, the evaluation's config, the model's traits and the
    transfer attack's surrogate (None without one)."""
    model: Any
    cfg: Any
    traits: Any = None
    surrogate: Any = None

    def budget(self, name: str):
        return self.cfg.budget(name)


RunFunction = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Generator], int], torch.Tensor]


@dataclass
class Planned:
    """An attack as ``make`` plans it: the parameters reported in eval.json and its run function."""
    params: dict
    run: RunFunction                      # (x, y, generator, seed) -> adversarial x on the model's device
    examples: Optional[int] = None        # attack only the first N examples (the others are left clean)


@dataclass(frozen=True)
class Attack:
    name: str
    make: Callable[[PlanContext, float], Planned]
    role: Role
    config: Optional[type] = None         # its budget dataclass (None: it has none of its own)
    budget: str = ""                      # the [attack.<budget>] table it reads; "" = its name
    suite: str = "full"                   # "paper" (every reported eps) or "full" (the main eps)
    cascadable: bool = False
    must_not_beat: tuple = ()
    row: Optional[str] = None
    variant_of: Optional[str] = None
    curve: bool = False
    applies: Optional[Callable[[PlanContext], bool]] = None
    description: str = ""

    @property
    def budget_name(self) -> str:
        return self.budget or self.name

    @property
    def reference(self) -> bool:
        """A white-box reference: a white-box or EOT attack bound by no other row (not a one-step attack)."""
        return self.role in REFERENCE_ROLES and not self.must_not_beat


REGISTRY: dict[str, Attack] = {}
SUITES = ("paper", "full")   # "full" holds the paper suite's attacks too


def register(attack: Attack) -> Attack:
    """Add ``attack`` to :data:`REGISTRY` (checked: its role, suite and budget dataclass)."""
    if not isinstance(attack.role, Role):
        raise TypeError(f"attack {attack.name!r}: role must be a Role, got {attack.role!r}")
    if attack.suite not in SUITES:
        raise ValueError(f"attack {attack.name!r}: suite must be one of {SUITES}, got {attack.suite!r}")
    if attack.config is not None and not dataclasses.is_dataclass(attack.config):
        raise TypeError(f"attack {attack.name!r}: config must be a dataclass, got {attack.config!r}")
    shared = budget_configs().get(attack.budget_name)
    if attack.config is not None and shared not in (None, attack.config):
        raise ValueError(f"attack {attack.name!r}: budget {attack.budget_name!r} is already a {shared.__name__}")
    REGISTRY[attack.name] = attack
    return attack


def unregister(name: str) -> None:
    """Remove an entry (tests that register a toy attack put the registry back)."""
    REGISTRY.pop(name, None)


def get(name: str) -> Attack:
    if name not in REGISTRY:
        raise ValueError(f"unknown attack {name!r}; expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def budget_configs() -> dict[str, type]:
    """``{budget name: config dataclass}`` over the registry, in registration order."""
    out: dict[str, type] = {}
    for attack in REGISTRY.values():
        if attack.config is not None:
            out.setdefault(attack.budget_name, attack.config)
    return out


def suite_attacks(suite: str) -> list[Attack]:
    """The attacks of ``suite`` in registration order: the paper suite's, then (full) the strong ones."""
    if suite not in SUITES:
        raise ValueError(f"suite: expected one of {SUITES}, got {suite!r}")
    wanted = SUITES[:SUITES.index(suite) + 1]
    return sorted((a for a in REGISTRY.values() if a.suite in wanted), key=lambda a: SUITES.index(a.suite))


def with_role(*roles: Role) -> list[str]:
    return [name for name, attack in REGISTRY.items() if attack.role in roles]


def cascadable() -> list[str]:
    return [name for name, attack in REGISTRY.items() if attack.cascadable]


def base_name(row: str) -> str:
    """``"pgd_zero@24"`` -> ``"pgd_zero"``: the registry name of a reported row."""
    return row.split("@")[0]


def entry_of(row: str) -> Optional[Attack]:
    """The registry entry of a reported row (``pgd_zero@24`` too); None for combined rows and ``clean``."""
    return REGISTRY.get(base_name(row))


def reference_share(used: float, reference: float, source: str, complete: bool = True) -> dict:
    """A budget as a fraction of its reference budget (``source`` names the reference); ``complete`` is False
    when the budget leaves out part of the reference (e.g. some of AutoAttack's attacks) whatever its size."""
    fraction = used / reference
    return {"fraction": fraction, "reference": source, "below_reference": fraction < 1 or not complete}


def budget_field(**metadata) -> Any:
    """A budget field's ``dataclasses.field`` with its CLI ``flag`` and ``help`` in the metadata."""
    default = metadata.pop("default")
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)
