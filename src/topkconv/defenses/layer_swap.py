"""Model surgery shared by the defences and ``topkconv.convert``: find target layers, swap them, record it.

Targets are conv or linear layers picked by qualified name, ``"last:N"`` or a predicate. "Last" means
forward order when an example input is given (one traced forward pass with hooks) and definition
order (``model.named_modules()``) otherwise; the two agree for sequential models such as the VGGs.
Every swap reuses the dense layer's Parameter objects (``from_dense``), so state_dict keys stay the same
and a trained model keeps its weights.

A module may have several names (``self.again = self.conv``). ``named_modules()`` drops the duplicates, so
the walk here keeps them (``remove_duplicate=False``): a target may be named by any of its names, and a
swap puts the one new module under every name, so that sharing stays sharing. The old module's forward and
backward hooks move to the new one.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from torch import nn

from ..layers import resolve_k

Targets = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]

# The attribute of a converted model that lists what was replaced (one dict per swapped layer).
REPLACED_ATTR = "topkconv_replaced"


def all_names(model: nn.Module) -> dict[int, list[str]]:
    """``id(module) -> every qualified name it has in model`` (aliases included; not the root)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and name not in names.setdefault(id(module), []):
            names[id(module)].append(name)
    return names


def layers_in_order(model: nn.Module, layer_type: type, example_input=None) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every ``layer_type`` module (once, under its first name), in forward order when
    ``example_input`` is given (modules the traced pass never calls are left out), else in definition order."""
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, layer_type) and name]  # not the root
    if example_input is None:
        return named
    called: list[int] = []

    def note(module, args):
        if id(module) not in called:
            called.append(id(module))

    handles = [m.register_forward_pre_hook(note) for _, m in named]
    flags = [(m, m.training) for m in model.modules()]
    model.eval()  # no BatchNorm statistics move, no dropout draws
    try:
        with torch.no_grad():
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags:
            module.training = training
    by_id = {id(m): (name, m) for name, m in named}
    return [by_id[i] for i in called]


def resolve_targets(model: nn.Module, targets: Targets, layer_type: type, example_input=None,
                    defense: str = "") -> list[tuple[str, nn.Module]]:
    """The target layers, as ``(qualified name, module)`` in (forward or definition) order.

    ``targets``: None (every ``layer_type`` layer), ``"last:N"``, a list of qualified names, or a predicate
    ``(name, module) -> bool`` called on every ``layer_type`` layer. Errors name the offending target.
    """
    kind = layer_type.__name__
    ordered = layers_in_order(model, layer_type, example_input)
    if targets is None:
        chosen = ordered
    elif isinstance(targets, str):
        chosen = ordered[-_last_n(targets, len(ordered), kind):]
    elif callable(targets):
        chosen = [(name, m) for name, m in ordered if targets(name, m)]
    elif isinstance(targets, (list, tuple)):
        modules = dict(model.named_modules(remove_duplicate=False))  # any alias names its module
        for name in targets:
            if not isinstance(name, str):
                raise ValueError(f"targets: expected qualified module names, got {name!r}")
            if name not in modules:
                known = [n for n, _ in ordered]
                raise ValueError(f"target {name!r}: no such module in the model ({kind} layers: "
                                 f"{', '.join(known[:12])}{' ...' if len(known) > 12 else ''})")
            if name == "":
                raise ValueError("target '': that is the model itself; wrap it in a module to convert it")
            if not isinstance(modules[name], layer_type):
                raise ValueError(f"target {name!r} is a {type(modules[name]).__name__}, not a {kind}"
                                 f"{f': {defense!r} converts {kind} layers' if defense else ''}")
        first_name = {id(m): name for name, m in model.named_modules()}
        wanted = {first_name[id(modules[name])] for name in targets}  # two aliases of one module: one target
        position = {name: i for i, (name, _) in enumerate(ordered)}
        chosen = sorted([(n, modules[n]) for n in wanted], key=lambda item: position.get(item[0], len(position)))
    else:
        raise ValueError(f"targets: expected None, 'last:N', a list of module names or a predicate, got {targets!r}")
    if not chosen:
        raise ValueError(f"targets={targets!r} selects no {kind} layer of the model")
    return chosen


def _last_n(text: str, available: int, kind: str) -> int:
    head, _, count = text.partition(":")
    if head != "last" or not count.isdigit() or int(count) < 1:
        raise ValueError(f"targets={text!r}: expected 'last:N' with N a positive count")
    if int(count) > available:
        raise ValueError(f"targets={text!r}: the model has only {available} {kind} layers")
    return int(count)


def swap(model: nn.Module, name: str, new: nn.Module) -> list[str]:
    """Put ``new`` where the submodule ``name`` is, under every name that module has (its parents'
    attributes), keeping the key names; its hooks move to ``new``. Returns the names."""
    old = model.get_submodule(name)
    names = all_names(model).get(id(old), [name])
    carry_hooks(name, old, new)
    for each in names:
        parent_name, _, child = each.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return names


# The hook tables of an nn.Module that run around its forward (and its backward, through the forward).
HOOK_TABLES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


def carry_hooks(name: str, old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the hooks of ``old``: the very same tables, so a handle the user holds still removes its
    hook. Refuses, naming the hooks, when ``new`` already has hooks of its own."""
    if not any(getattr(old, table, None) for table in HOOK_TABLES):
        return
    own = [table for table in HOOK_TABLES if getattr(new, table, None)]
    if own:
        raise ValueError(f"target {name!r}: its hooks ({hook_names(old)}) cannot be carried over to the new "
                         f"{type(new).__name__}, which has hooks of its own ({', '.join(own)})")
    for table in HOOK_TABLES:
        if hasattr(old, table):
            setattr(new, table, getattr(old, table))
    if getattr(old, "_is_full_backward_hook", None) is not None:
        new._is_full_backward_hook = old._is_full_backward_hook


def hook_names(module: nn.Module) -> str:
    hooks = [hook for table in HOOK_TABLES for hook in (getattr(module, table, None) or {}).values()
             if callable(hook)]
    return ", ".join(getattr(hook, "__qualname__", type(hook).__name__) for hook in hooks)


def check_convertible(name: str, module: nn.Module) -> None:
    """Refuse, naming the target, what a routing layer cannot reproduce: grouped convs, odd padding modes.

    (``from_dense`` refuses them too, naming the layer; here the message names the target and nothing has
    been swapped yet.)"""
    weight = getattr(module, "weight", None)
    if weight is not None and not isinstance(weight, nn.Parameter):
        raise ValueError(f"target {name!r} ({type(module).__name__}) has a computed weight (weight norm, pruning or "
                         f"another parametrization); routing layers need a plain weight: remove it first "
                         f"(torch.nn.utils.parametrize.remove_parametrizations, torch.nn.utils.remove_weight_norm "
                         f"or torch.nn.utils.prune.remove)")
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            what = "depthwise" if module.groups == module.in_channels else "grouped"
            raise ValueError(f"target {name!r} is a {what} conv (groups={module.groups}); top-k routing ranks "
                             f"whole input channels and needs groups=1")
        if module.padding_mode != "zeros":
            raise ValueError(f"target {name!r} pads with {module.padding_mode!r}; routing layers support "
                             f"padding_mode='zeros' only")


def convert_layers(model: nn.Module, chosen: list[tuple[str, nn.Module]], ks: list, layer_type: type,
                   fan: Callable[[nn.Module], int], k_names: list[str], **options) -> list[dict]:
    """Swap each chosen layer for ``layer_type.from_dense(layer, k)``; returns (and records) what changed.

    Every target is checked (type, groups, k against its fan) before the first swap, so an error leaves
    the model as it was.
    """
    counts = []
    for (name, module), k, k_name in zip(chosen, ks, k_names):
        if isinstance(module, layer_type):
            raise ValueError(f"target {name!r} is already a {layer_type.__name__}")
        check_convertible(name, module)
        try:
            counts.append(resolve_k(k, fan(module), k_name))
        except ValueError as err:
            raise ValueError(f"{err} (target {name!r}: {type(module).__name__} with fan-in {fan(module)})") from None
    replaced = []
    for (name, module), k in zip(chosen, counts):
        names = swap(model, name, layer_type.from_dense(module, k, **options))
        entry = {"name": name, "replaced": type(module).__name__, "by": layer_type.__name__, "k": k,
                 "fan": fan(module), **options}
        if len(names) > 1:
            entry["aliases"] = [each for each in names if each != name]
        replaced.append(entry)
    record(model, replaced)
    return replaced


def record(model: nn.Module, replaced: list[dict]) -> None:
    """Append ``replaced`` to the model's :data:`REPLACED_ATTR` list (what a conversion changed)."""
    if replaced:
        object.__setattr__(model, REPLACED_ATTR, list(getattr(model, REPLACED_ATTR, [])) + replaced)


def replace_modules(model: nn.Module, layer_type: type, make: Callable[[nn.Module], nn.Module]) -> list[str]:
    """Replace every ``layer_type`` submodule by ``make(module)``; returns their names."""
    names = [name for name, m in model.named_modules() if isinstance(m, layer_type) and name]
    replaced: list[str] = []
    for name in names:  # each module once; swap puts its replacement under every alias
        replaced += swap(model, name, make(model.get_submodule(name)))
    return replaced
