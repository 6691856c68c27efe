"""The defence registry: one :class:`Defense` entry per defence, read by everything that needs to know one.

The CLI's choices and flags, ``build_model``, ``topkconv.convert``, the config parser and the attack plan
(``has_routing``, ``is_stochastic``, ``adaptive_attacks``) all read :data:`REGISTRY`; none keeps a copy.
A defence names the adaptive attacks it calls for by their names in :data:`topkconv.attacks.REGISTRY` (a BPDA
stand-in or an EOT attack); the evaluation's plan checks them, so the defences never import the attacks.
A new defence is one file that calls :func:`register` plus its import line in ``defenses/__init__.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

@dataclass(frozen=True)
class LayerRouting:
    """How a routing defence converts one dense layer (what ``topkconv.convert`` swaps).

    ``dense`` is the layer type it replaces, ``layer`` the routing layer (with ``from_dense(layer, k, **options)``),
    ``options`` the config fields passed on to ``from_dense`` (e.g. ``("criterion",)``), and ``fan`` gives the
    count that ``k`` is taken of (TopKConv: the input channels; TKC-neuron: the output channels).
    """

    dense: type
    layer: type
    fan: Callable[[nn.Module], int]
    options: tuple = ()


@dataclass(frozen=True)
class Defense:
    name: str
    config: type                 # dataclass of the defence's own options; has a field `kind` == name
    apply: Callable              # apply(model, cfg) -> model: builds the defence into a freshly built model, in place
    routing: bool = False        # top-k routing: gradients are piecewise, BPDA stand-ins apply
    stochastic: bool = False     # random at test time: EOT applies
    test_time_only: bool = False  # acts only in eval mode
    layer_types: tuple = ()      # module classes that identify it inside ANY model
    adaptive_attacks: tuple = ()  # registry names of the attacks it calls for (topkconv.attacks.REGISTRY)
    layer_routing: Optional[LayerRouting] = None  # routing defences: the per-layer swap topkconv.convert uses
    description: str = ""        # one line for the CLI's help


REGISTRY: dict[str, Defense] = {}


def register(defense: Defense) -> Defense:
    """Add ``defense`` to :data:`REGISTRY` (checked: a config dataclass whose ``kind`` is the name)."""
    if not dataclasses.is_dataclass(defense.config):
        raise TypeError(f"defense {defense.name!r}: config must be a dataclass, got {defense.config!r}")
    kind = getattr(defense.config(), "kind", None)
    if kind != defense.name:
        raise ValueError(f"defense {defense.name!r}: its config's `kind` field must default to {defense.name!r}, "
                         f"got {kind!r}")
    if isinstance(defense.adaptive_attacks, str) or not all(isinstance(a, str) for a in defense.adaptive_attacks):
        raise TypeError(f"defense {defense.name!r}: adaptive_attacks must be a tuple of attack names, "
                        f"got {defense.adaptive_attacks!r}")
    REGISTRY[defense.name] = defense
    return defense


def get(name: str) -> Defense:
    """The registered defence ``name``; ValueError listing the choices otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown defense {name!r}; expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def config_fields(defense: Defense) -> list[str]:
    """The defence's own option names (its config's fields but ``kind``)."""
    return [f.name for f in dataclasses.fields(defense.config) if f.name != "kind"]


def make_config(kind: str = "standard", **options):
    """The config of defence ``kind`` with ``options``; an option it does not have is an error naming both."""
    defense = get(kind)
    known = config_fields(defense)
    for key in options:
        if key not in known:
            raise ValueError(f"defense {kind!r} has no option {key!r}; its options: {', '.join(known) or 'none'}")
    return defense.config(**options)


def defenses_in(model: nn.Module) -> list[Defense]:
    """The registered defences whose layer types occur in ``model``, in registry order."""
    types = {type(module) for module in model.modules()}
    return [d for d in REGISTRY.values() if d.layer_types and any(issubclass(t, d.layer_types) for t in types)]


def has_routing(model: nn.Module) -> bool:
    """Whether ``model`` holds a routing defence's layer (BPDA applies)."""
    return any(d.routing for d in defenses_in(model))


def is_stochastic(model: nn.Module) -> bool:
    """Whether ``model`` holds a defence that is random at test time (EOT applies)."""
    return any(d.stochastic for d in defenses_in(model))


def adaptive_attacks(model: nn.Module) -> tuple[str, ...]:
    """The adaptive attacks (registry names) the defences in ``model`` call for, each once, in registry order."""
    return tuple(dict.fromkeys(name for d in defenses_in(model) for name in d.adaptive_attacks))
