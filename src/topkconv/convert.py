"""``topkconv.convert``: put a registered defence into any PyTorch model.

Kept free of top-level torch imports, so ``import topkconv`` (and ``topkconv --help``) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from .defenses.layer_swap import Targets


def convert(model: "nn.Module", defence: str, targets: "Targets" = None, k: Any = None, example_input=None,
            inplace: bool = False, **options) -> "nn.Module":
    """``model`` with the registered defence ``defence`` put in; a converted copy unless ``inplace``.

    Routing defences (``"topk_conv"``, ``"tkc_neuron"``: conv layers; ``"dynamic_k"``: linear layers)
    swap each target layer for its routing twin (``TopKConv2d.from_conv`` ...), which reuses the layer's
    own weights, bias, device, dtype, stride, padding and dilation. With ``k`` equal to each target's
    fan-in the converted model computes what the original does.

    - ``targets``: a list of qualified module names (``"layer4.1.conv2"``); ``"last:N"``, the last N convs
      (or linear layers); a predicate ``(name, module) -> bool``, called on every conv (or linear) layer;
      or None, every one of them.
    - Order: "last" is **forward order** from one traced forward pass of ``example_input`` (an input
      tensor, or a tuple of them; run under ``torch.no_grad`` in eval mode, modes restored), which also
      leaves out layers the forward never calls. **Without ``example_input`` it is definition order**
      (``model.named_modules()``), which is the forward order of sequential models but not of every model.
    - ``k``: a count, a fraction of each target's fan-in (TopKConv and Dynamic-k: input channels/features;
      TKC-neuron: output channels), or a list with one entry per target (in the order above). Numpy
      scalars and 0-d tensors count as the Python number they hold; a 1-d array or tensor as a list.
    - A module with several names (``self.again = self.conv``) may be targeted by any of them; it is
      replaced under every name by the one new layer, which also takes over its forward and backward hooks.
    - ``options``: the defence's own layer options, e.g. ``criterion="sum"`` or ``positive_only=True``.

    Defences without a per-layer swap (``"sap"``, ``"dropout"`` ...) take no ``targets`` or ``k``: their
    ``apply`` runs with a config made of ``options`` (e.g. ``convert(m, "sap", sap_frac=0.5)``).

    The result lists what was replaced in its ``topkconv_replaced`` attribute (one dict per layer: name,
    replaced type, new type, k, fan and options) and each new layer's ``repr`` shows its k and criterion.
    Errors name the target: an unknown name, a target that is not a conv or linear layer, a grouped or
    depthwise conv, a parametrized (weight-normed, pruned) weight, or a k outside 1..fan-in for that
    layer; nothing is changed then.
    """
    import copy

    from . import defenses
    from .defenses.layer_swap import convert_layers, resolve_targets

    entry = defenses.get(defence)
    routing = entry.layer_routing
    if not inplace:
        model = copy.deepcopy(model)
    if routing is None:
        for name, value in (("targets", targets), ("k", k)):
            if value is not None:
                raise ValueError(f"convert: defence {defence!r} transforms the whole model; it takes no {name}= "
                                 f"(its options: {', '.join(defenses.config_fields(entry)) or 'none'})")
        return entry.apply(model, defenses.make_config(defence, **options))
    unknown = sorted(set(options) - set(routing.options))
    if unknown:
        raise ValueError(f"convert: defence {defence!r} has no layer option {unknown[0]!r}; its layer options: "
                         f"{', '.join(routing.options) or 'none'} (layers are chosen by targets= and k=)")
    defenses.make_config(defence, **options)  # the defence's own checks of the option values
    if k is None:
        raise ValueError(f"convert: k is required for {defence!r}: a count, a fraction of each target's fan-in, "
                         f"or a list with one per target")
    chosen = resolve_targets(model, targets, routing.dense, example_input, defence)
    names = [f"k for target {name!r}" for name, _ in chosen]
    convert_layers(model, chosen, per_target(k, chosen), routing.layer, routing.fan, names, **options)
    return model


def per_target(k: Any, chosen: list) -> list:
    """One k per chosen target: ``k`` repeated, or the list given (which must have one per target)."""
    k = plain_number(k)
    ks = [plain_number(each) for each in k] if isinstance(k, (list, tuple)) else [k] * len(chosen)
    if len(ks) != len(chosen):
        raise ValueError(f"convert: k has {len(ks)} entries but targets selects {len(chosen)} layers "
                         f"({', '.join(name for name, _ in chosen)})")
    return ks


def plain_number(value: Any) -> Any:
    """A numpy scalar or a 0-d tensor as the Python number it holds; a 1-d array or tensor as a list;
    anything else unchanged (the layers' own checks then name what is wrong with it)."""
    ndim = getattr(value, "ndim", None)
    if ndim == 0 and hasattr(value, "item"):
        return value.item()
    if ndim == 1 and hasattr(value, "tolist"):
        return value.tolist()
    return value
