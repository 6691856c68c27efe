"""Figures 3 and 4 of the paper, and routing statistics beyond it.

* Figure 3 (:func:`figure3_feature_maps`): the feature maps a TopKConv layer with the ``max`` criterion
  outputs, against the same layer of a model trained with ``sum``, for a few test images.
* Figure 4 (:func:`figure4_gradcam`): GradCAM (captum's ``LayerGradCam`` on the last convolution) for
  the true class, on each model's own adversarial images.
* Routing statistics (:func:`routing_statistics`): for every routing layer, which inputs each output
  really selects across the test set, per true class, and how much the classes' routes overlap.
  The selections come from each layer's own ``selection_mask`` on its input (captured with a forward
  hook), computed by the same kernel as its forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attacks.common import attack_mode, is_routing_layer, routing_layers
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .layers import TopKConv2d


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> str:
    """Save a matplotlib figure as PNG atomically and close it."""
    buffer = __import__("io").BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _matplotlib().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return str(path)


def _show(ax, image: torch.Tensor, title: str = "", cmap: Optional[str] = None) -> None:
    image = image.detach().float().cpu()
    if image.dim() == 3 and image.shape[0] == 1:
        image = image[0]
    if image.dim() == 3:
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    else:
        ax.imshow(image.numpy(), cmap=cmap or "gray")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


# ---------------------------------------------------------------- routing selections

def selection_mask(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Boolean routes of ``layer`` on input ``x``: (B, outputs, inputs), from the layer's own
    ``selection_mask`` (the same kernel as its forward pass).

    TopKLinear: the k (weight, input) products summed per output unit. TopKConv2d: the k input
    channels summed per output channel. TKC-neuron selects output channels only, so it has a single
    "output" whose inputs are the layer's output channels: (B, 1, out_channels).
    """
    if not is_routing_layer(layer):
        raise ValueError(f"selection_mask: {type(layer).__name__} is not a routing layer (it has no selection_mask)")
    with torch.no_grad():
        mask = layer.selection_mask(x)
    return mask.unsqueeze(1) if mask.dim() == 2 else mask


def _routing_kind(layer: nn.Module) -> str:
    """The registry name of the defence that inserts ``layer`` (its class name if none does)."""
    from .defenses import REGISTRY

    return next((d.name for d in REGISTRY.values() if d.layer_types and isinstance(layer, d.layer_types)),
                type(layer).__name__)


@dataclass
class LayerRoutes:
    """Selection counts of one routing layer: ``counts[c, o, i]`` = test examples of true class c
    for which output o summed input i."""
    name: str
    kind: str
    k: int
    counts: torch.Tensor
    examples_per_class: torch.Tensor
    summary: dict = field(default_factory=dict)


def collect_routes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                   batch_size: int = 64) -> dict:
    """Run the test set through ``model`` and count every routing layer's selections per class."""
    layers = dict(routing_layers(model))
    counts: dict = {}
    current: dict = {}

    def hook(name):
        def record(module, inputs, _output):
            mask = selection_mask(module, inputs[0]).to(torch.int32)
            if name not in counts:
                counts[name] = torch.zeros((num_classes,) + tuple(mask.shape[1:]), dtype=torch.int32)
            counts[name].index_add_(0, current["y"].cpu(), mask.cpu())
        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        with attack_mode(model) as device, torch.no_grad():
            for start in range(0, len(x), batch_size):
                current["y"] = y[start:start + batch_size]
                model(x[start:start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
    per_class = torch.bincount(y.cpu(), minlength=num_classes)
    routes = {}
    for name, layer in layers.items():
        if name not in counts:
            continue  # a layer the forward pass never reached
        route = LayerRoutes(name, _routing_kind(layer), layer.k, counts[name], per_class)
        route.summary = summarize_routes(route)
        routes[name] = route
    return routes


def jaccard_matrix(sets: torch.Tensor) -> torch.Tensor:
    """Pairwise Jaccard index of boolean rows (classes x elements); 1 where both rows are empty."""
    sets = sets.reshape(sets.shape[0], -1).float()
    inter = sets @ sets.T
    sizes = sets.sum(1)
    union = sizes[:, None] + sizes[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def summarize_routes(route: LayerRoutes, core_share: float = 0.5) -> dict:
    """Distinct inputs used per output (all test examples, and per class), and the overlap of the
    classes' routes: Jaccard of the sets of (output, input) pairs a class ever uses ("any"), and of
    those a class uses in at least ``core_share`` of its examples ("core")."""
    counts = route.counts
    classes_present = route.examples_per_class > 0
    used_any = counts.sum(0) > 0                                  # (outputs, inputs)
    distinct_per_output = used_any.sum(-1).float()
    per_class_used = counts > 0                                   # (classes, outputs, inputs)
    per_class_distinct = per_class_used.sum(-1).float().mean(-1)  # mean over outputs, per class
    share = counts.float() / route.examples_per_class.clamp_min(1).view(-1, 1, 1).float()
    core = share >= core_share
    present = classes_present.nonzero().flatten()
    jac_any = jaccard_matrix(per_class_used[present])
    jac_core = jaccard_matrix(core[present])
    off = ~torch.eye(len(present), dtype=torch.bool)
    mean_off = lambda m: float(m[off].mean()) if len(present) > 1 else float("nan")  # noqa: E731
    return {
        "layer": route.name,
        "kind": route.kind,
        "k": route.k,
        "outputs": int(counts.shape[1]),
        "fan_in": int(counts.shape[2]),
        "distinct_per_output_mean": float(distinct_per_output.mean()),
        "distinct_per_output_min": int(distinct_per_output.min()),
        "distinct_per_output_max": int(distinct_per_output.max()),
        "inputs_never_used": int((~used_any.any(0)).sum()),
        "distinct_per_output_per_class": {int(c): float(per_class_distinct[c]) for c in present},
        "jaccard_any_mean": mean_off(jac_any),
        "jaccard_core_mean": mean_off(jac_core),
        "jaccard_core": jac_core.tolist(),
        "classes": [int(c) for c in present],
        "core_share": core_share,
    }


def routing_report(routes_by_model: dict, reports_dir, class_names: Optional[list] = None,
                   meta: Optional[dict] = None) -> dict:
    """Write ``routing.md``, ``routing.json`` and ``routing.png`` for ``{model label: collect_routes(...)}``."""
    reports_dir = Path(reports_dir)
    lines = ["# Routing statistics", ""]
    for key, value in (meta or {}).items():
        lines.append(f"- **{key}**: {value}")
    lines += [
        "- *distinct/output*: how many different inputs an output really sums across the test set "
        "(k of them per example); *per class*: the same within one true class, averaged over outputs.",
        "- *Jaccard any*: mean overlap, over pairs of classes, of the (output, input) pairs a class ever "
        "uses; *Jaccard core*: of the pairs a class uses in at least half of its examples.",
        "- TKC-neuron routes output channels, so it has one \"output\" whose inputs are its channels.", "",
        "| model | layer | kind | k | fan-in | outputs | distinct/output mean (min-max) | "
        "per class mean | inputs never used | Jaccard any | Jaccard core |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    stats = {}
    for label, routes in routes_by_model.items():
        stats[label] = {}
        for name, route in routes.items():
            s = route.summary
            stats[label][name] = s
            per_class = s["distinct_per_output_per_class"]
            class_mean = sum(per_class.values()) / max(1, len(per_class))
            lines.append(
                f"| {label} | {name} | {s['kind']} | {s['k']} | {s['fan_in']} | {s['outputs']} | "
                f"{s['distinct_per_output_mean']:.1f} ({s['distinct_per_output_min']}-"
                f"{s['distinct_per_output_max']}) | {class_mean:.1f} | {s['inputs_never_used']} | "
                f"{s['jaccard_any_mean']:.3f} | {s['jaccard_core_mean']:.3f} |")
    if not stats or not any(stats.values()):
        lines.append("| (no routing layers) | | | | | | | | | | |")
    atomic_write_text(reports_dir / "routing.md", "\n".join(lines) + "\n")
    atomic_write_json(reports_dir / "routing.json", stats)
    png = plot_routing(routes_by_model, reports_dir / "routing.png", class_names)
    return {"md": str(reports_dir / "routing.md"), "json": str(reports_dir / "routing.json"), "png": png}


def plot_routing(routes_by_model: dict, path, class_names: Optional[list] = None) -> str:
    """Per routing layer: distinct inputs used per class (against k), and the classes' core Jaccard."""
    plt = _matplotlib()
    items = [(label, route) for label, routes in routes_by_model.items() for route in routes.values()]
    rows = max(1, len(items))
    fig, axes = plt.subplots(rows, 2, figsize=(8, 2.6 * rows), squeeze=False)
    if not items:
        axes[0, 0].text(0.5, 0.5, "no routing layers", ha="center")
    for row, (label, route) in enumerate(items):
        s = route.summary
        classes = s["classes"]
        names = [str(class_names[c]) if class_names else str(c) for c in classes]
        ax = axes[row, 0]
        ax.bar(range(len(classes)), [s["distinct_per_output_per_class"][c] for c in classes], color="tab:blue")
        ax.axhline(s["k"], color="tab:red", linestyle="--", label=f"k = {s['k']}")
        ax.axhline(s["distinct_per_output_mean"], color="tab:green", linestyle=":", label="all classes")
        ax.set_xticks(range(len(classes)), names, fontsize=6)
        ax.set_ylabel("distinct inputs / output", fontsize=7)
        ax.set_title(f"{label}: {route.name} ({s['kind']}, fan-in {s['fan_in']})", fontsize=8)
        ax.legend(fontsize=6)
        ax = axes[row, 1]
        image = ax.imshow(torch.tensor(s["jaccard_core"]).numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(classes)), names, fontsize=6)
        ax.set_yticks(range(len(classes)), names, fontsize=6)
        ax.set_title(f"core-route Jaccard between classes (mean {s['jaccard_core_mean']:.2f})", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------- Figure 3

def _first_layer(model: nn.Module, cls) -> tuple:
    for name, module in model.named_modules():
        if isinstance(module, cls):
            return name, module
    raise ValueError(f"model has no {cls.__name__} layer")


def _capture_output(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    captured = {}
    handle = layer.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o.detach()))
    try:
        with attack_mode(model) as device, torch.no_grad():
            model(x.to(device))
    finally:
        handle.remove()
    return captured["out"].cpu()


def figure3_feature_maps(model_max: nn.Module, model_sum: nn.Module, x: torch.Tensor, path,
                         channels: int = 4) -> str:
    """Feature maps of the first TopKConv layer of a ``max`` model (left) and a ``sum`` model (right).

    For each image the ``channels`` maps with the highest spatial max are shown, ReLU applied as in
    the network that follows the layer.
    """
    plt = _matplotlib()
    panels = []
    for model in (model_max, model_sum):
        name, layer = _first_layer(model, TopKConv2d)
        panels.append((name, layer.criterion, F.relu(_capture_output(model, layer, x))))
    n = len(x)
    fig, axes = plt.subplots(n, 1 + 2 * channels, figsize=(1.2 * (1 + 2 * channels), 1.3 * n), squeeze=False)
    for i in range(n):
        _show(axes[i, 0], x[i], "input" if i == 0 else "")
        for p, (name, criterion, maps) in enumerate(panels):
            top = maps[i].amax(dim=(-2, -1)).topk(min(channels, maps.shape[1])).indices
            for j in range(channels):
                ax = axes[i, 1 + p * channels + j]
                if j < len(top):
                    _show(ax, maps[i, top[j]], f"{criterion} ch{int(top[j])}", cmap="magma")
                else:
                    ax.axis("off")
    fig.suptitle(f"Figure 3: TopKConv feature maps ({panels[0][0]}, the {channels} strongest channels per image), "
                 f"max criterion (left) vs sum criterion (right)", fontsize=9)
    return save_figure(fig, path)


# ---------------------------------------------------------------- Figure 4

def last_conv(model: nn.Module) -> nn.Module:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("model has no convolution for GradCAM")
    return convs[-1]


def gradcam(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """captum LayerGradCam on the last convolution for class ``target``, upsampled to the image: (B, H, W)."""
    from captum.attr import LayerAttribution, LayerGradCam

    with attack_mode(model):
        cam = LayerGradCam(model, last_conv(model)).attribute(x, target=target, relu_attributions=True)
    cam = LayerAttribution.interpolate(cam.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")
    cam = cam[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).cpu()


def figure4_gradcam(models: dict, x: torch.Tensor, y: torch.Tensor, adversarial: dict, path,
                    class_names: Optional[list] = None) -> str:
    """GradCAM for the true class on each model's own adversarial images.

    ``models`` and ``adversarial`` map a label (e.g. "Baseline", "Dynamic-k") to the model and to its
    adversarial version of ``x``. The title of every panel gives the model's prediction.
    """
    plt = _matplotlib()
    labels = list(models)
    n = len(x)
    fig, axes = plt.subplots(n, 1 + len(labels), figsize=(1.8 * (1 + len(labels)), 1.8 * n), squeeze=False)
    name = (lambda c: str(class_names[c])) if class_names else (lambda c: str(c))
    columns = []
    for label in labels:
        model, x_adv = models[label], adversarial[label]
        with attack_mode(model) as device, torch.no_grad():
            predicted = model(x_adv.to(device)).argmax(1).cpu()
        columns.append((label, x_adv.cpu(), gradcam(model, x_adv.to(device), y.to(device)), predicted))
    for i in range(n):
        _show(axes[i, 0], x[i], f"clean, true {name(int(y[i]))}")
        for j, (label, x_adv, cam, predicted) in enumerate(columns):
            ax = axes[i, 1 + j]
            _show(ax, x_adv[i], f"{label}: pred {name(int(predicted[i]))}")
            ax.imshow(cam[i].numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    fig.suptitle("Figure 4: GradCAM for the true class on adversarial images", fontsize=9)
    return save_figure(fig, path)


# ---------------------------------------------------------------- tables over seeds, and sweeps

def interval_bars(summary: dict, paper: dict, path, title: str = "", row_names: Optional[dict] = None) -> str:
    """A grouped bar chart of a table over seeds: one group per measure, one bar per column at its mean,
    the 95% interval as an error bar, each seed's value as a dot, and the paper's number as a black bar.

    ``summary`` is :func:`topkconv.reproduce.tables.summarise`'s ``{"measures", "cells"}``; ``paper`` maps
    a column and a measure to the paper's number (or None).
    """
    plt = _matplotlib()
    measures = list(summary["measures"])
    labels = list(summary["cells"])
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(measures) * max(1, len(labels)) * 0.45 + 2), 3.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, label in enumerate(labels):
        colour = colours[j % len(colours)]
        for i, measure in enumerate(measures):
            cell = summary["cells"][label].get(measure)
            x = i - 0.4 + width * (j + 0.5)
            if cell is not None:
                ax.bar(x, cell["mean"], width * 0.9, color=colour, alpha=0.55, label=label if i == 0 else None)
                ax.errorbar(x, cell["mean"], yerr=[[cell["mean"] - cell["lo"]], [cell["hi"] - cell["mean"]]],
                            color="black", capsize=2, lw=0.8)
                seeds = cell["per_seed"]
                offsets = [width * 0.25 * (k - (len(seeds) - 1) / 2) / max(1, len(seeds) - 1) for k in range(len(seeds))]
                ax.scatter([x + o for o in offsets], seeds, s=7, color=colour, edgecolor="black", linewidth=0.4,
                           zorder=3)
            value = (paper.get(label) or {}).get(measure)
            if value is not None:
                ax.hlines(value, x - width * 0.45, x + width * 0.45, color="black", lw=1.6, zorder=4,
                          label="paper" if not any(t.get_label() == "paper" for t in ax.collections) else None)
    ax.set_xticks(range(len(measures)))
    ax.set_xticklabels([(row_names or {}).get(m, m) for m in measures], fontsize=7, rotation=15)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=min(len(labels) + 1, 6), loc="upper center", bbox_to_anchor=(0.5, -0.2),
              frameon=False)  # below the axes: clean accuracies reach the top
    return save_figure(fig, path)


def sweep_plot(values: list, series: dict, path, title: str = "", xlabel: str = "value") -> str:
    """One panel per measure: the mean and its 95% interval against the swept value, one line per column,
    each seed's value as a dot. ``series[measure][label]`` is a list (one per value) of
    ``{"mean", "lo", "hi", "per_seed"}`` dicts or None."""
    plt = _matplotlib()
    measures = list(series)
    fig, axes = plt.subplots(1, len(measures), figsize=(3.2 * len(measures), 3.2), squeeze=False)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = list(values) if numeric else list(range(len(values)))
    for ax, measure in zip(axes[0], measures):
        for label, cells in series[measure].items():
            points = [(x, c) for x, c in zip(xs, cells) if c is not None]
            if not points:
                continue
            line = ax.errorbar([x for x, _ in points], [c["mean"] for _, c in points],
                               yerr=[[c["mean"] - c["lo"] for _, c in points], [c["hi"] - c["mean"] for _, c in points]],
                               marker="o", capsize=3, lw=1, label=label)
            for x, c in points:
                ax.scatter([x] * len(c["per_seed"]), c["per_seed"], s=6, color=line[0].get_color(), alpha=0.6)
        ax.set_title(measure, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        if not numeric:
            ax.set_xticks(xs)
            ax.set_xticklabels([str(v) for v in values], fontsize=7)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_accuracy_vs_eps(result: dict, title: str = "") -> bytes:
    """PNG bytes: accuracy against eps (the curve, or the PGD points of the paper suite), with chance."""
    import io

    from .attacks import registry

    plt = _matplotlib()
    points = [(p["eps"], p["accuracy"]) for p in result["eps_curve"]]
    label = "white-box PGD" + (" (EOT)" if result["model"]["stochastic"] else "")
    if not points:
        points = [(0.0, result["clean"])] + sorted(
            (a["params"]["eps"], a["accuracy"]) for name, a in result["attacks"].items()
            if name == "pgd" or name.startswith("pgd@"))
        label = "PGD"
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
    eps = result["worst_case"]["eps"]
    # One marker per attack at eps that is neither the curve's, part of a row, nor a larger-budget variant.
    markers = [name for name, entry in registry.REGISTRY.items()
               if not (entry.curve or entry.row or entry.variant_of)]
    for name in markers:
        if name in result["attacks"]:
            ax.plot([eps], [result["attacks"][name]["accuracy"]], "x", label=name)
    ax.plot([eps], [result["worst_case"]["accuracy"]], "k*", label="worst case")
    ax.axhline(1.0 / result["model"]["num_classes"], color="grey", ls="--", lw=1, label="chance")
    ax.set_xlabel("eps (0-255 units)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or f"accuracy vs eps (n = {result['n_examples']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
