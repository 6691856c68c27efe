"""Defences as model transforms, one file each, listed in :data:`REGISTRY`.

Each entry (:class:`Defense`) has its own config dataclass, ``apply(model, cfg)`` (builds the defence
into a freshly built model, in place), flags (routing, stochastic, test-time only), the module types
that identify it inside any model and the adaptive attacks it calls for. A new defence is one file
that calls :func:`register` and one import line below.
"""

from .registry import (REGISTRY, Defense, LayerRouting, adaptive_attacks, config_fields, defenses_in,
                       get, has_routing, is_stochastic, make_config, register)

# Registry order: the CLI's choices and the attack plan follow it.
from . import standard, dropout, dynamic_k, topk_conv, tkc_neuron, sap, pruned  # noqa: E402,F401  (they register)

__all__ = ["Defense", "LayerRouting", "REGISTRY", "register", "get", "make_config",
           "config_fields", "defenses_in", "has_routing", "is_stochastic", "adaptive_attacks"]
