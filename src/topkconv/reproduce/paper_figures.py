"""Figures 3 and 4 and the routing statistics, from the first seed's models of Table III's spec."""

from __future__ import annotations

from .spec import FiguresSpec, Study, display_path


def needed_labels(study: Study) -> list:
    if study.table.figures is None:
        raise ValueError(f"{study.table.path}: has no [figures] section; figures need Table III's spec")
    fig = study.table.figures_spec()
    return list(dict.fromkeys([fig.feature_max, fig.feature_sum, *fig.gradcam, *fig.routing]))


def run_figures(workspace, study: Study) -> dict:
    """Draw the figures from the (already trained) seed-0 models of ``study``; returns the paths."""
    from .. import distributed, figures
    from ..checkpoint import load_checkpoint
    from .workspace import test_tensors

    fig = study.table.figures_spec()
    needed = needed_labels(study)
    run_dirs = {label: workspace.run_dir(study.run_spec(label, 0)) for label in needed}
    spec = study.run_spec(needed[0], 0)
    device = distributed.pick_device(spec.train.device, distributed.context().local_rank)
    models = {label: load_checkpoint(run_dirs[label], device=device)[0].eval() for label in needed}
    limit = None if fig.routing_examples is None else max(fig.routing_examples, 64, fig.n_images)
    x, y, splits = test_tensors(spec, limit)
    names = list(getattr(splits, "classes", None) or []) or None
    reports = workspace.reports
    paths = {}
    n = min(fig.n_images, len(x))
    paths["figure3"] = figures.figure3_feature_maps(models[fig.feature_max], models[fig.feature_sum], x[:n],
                                                    reports / "figure3.png")
    paths["figure4"] = figure4(fig, spec, study.eps_list(), models, x, y, reports / "figure4.png", names)
    limit = fig.routing_examples or len(x)
    routes = {label: figures.collect_routes(models[label], x[:limit], y[:limit], spec.model.num_classes,
                                            batch_size=fig.routing_batch_size)
              for label in fig.routing}
    meta = {"preset": f"{study.table.preset} (spec {display_path(study.table.path)})",
            "data": f"{spec.data.name}, {min(limit, len(x))} test images",
            "models": ", ".join(f"{label} = runs/{run_dirs[label].name} (seed 0)" for label in fig.routing)}
    paths["routing"] = figures.routing_report(routes, reports, names, meta)
    for name, path in paths.items():
        print(f"{name}: {path}", flush=True)
    return paths


def figure4(fig: FiguresSpec, spec, eps_list: list, models: dict, x, y, path, class_names) -> str:
    """PGD each GradCAM model on its own; show images the first model (the baseline) gets wrong."""
    import torch

    from .. import figures
    from ..attacks import pgd

    eps = (fig.gradcam_eps if fig.gradcam_eps is not None else max(eps_list)) / 255.0
    # the paper's step (0.75 at eps 8) scaled with eps, so a larger radius is reached as the paper's is
    step = spec.attack.budget("pgd").step_size / 255.0 * (eps * 255.0 / spec.attack.eps)
    pool = min(len(x), max(64, fig.n_images))
    device = next(models[fig.gradcam[0]].parameters()).device
    xs, ys = x[:pool].to(device), y[:pool].to(device)
    generator = torch.Generator().manual_seed(spec.attack.seed)
    adversarial = {label: pgd(models[label], xs, ys, eps, step, spec.attack.budget("pgd").steps, generator=generator)
                   for label in fig.gradcam}
    first = models[fig.gradcam[0]]
    with torch.no_grad():
        fooled = (first(adversarial[fig.gradcam[0]]).argmax(1) != ys).nonzero().flatten()
    chosen = torch.tensor(list(dict.fromkeys(fooled.tolist() + list(range(pool))))[:fig.n_images], device=device)
    return figures.figure4_gradcam({label: models[label] for label in fig.gradcam}, xs[chosen].cpu(),
                                   ys[chosen].cpu(), {label: adv[chosen] for label, adv in adversarial.items()},
                                   path, class_names)
