"""Reproduce the paper's tables and figures from the experiment specs in ``experiments/*.toml``.

A table spec (``experiments/<table>-<preset>.toml``) names the table, a ``base`` RunSpec and a list of
``columns``; each column is the base with its own overrides merged in (``[columns.spec]``), so a
column says only how it differs. A column may instead be marked ``not_reproduced`` with the reason,
or be a pruned copy of another column (``prune_from``).

:func:`reproduce` trains every column (cached by ``RunSpec.hash()`` under ``<out>/runs/<hash>/``;
``--force`` retrains), then attacks it twice: the paper's FGSM and PGD at every eps on the test set
(``eval.json``, or its first ``eval_examples`` images), and the strong suite at each of ``strong_eps``
on the first ``attack.n_examples`` (``eval-strong-<eps>.json``). An evaluation is reused when its file
was made with the same attack config, data and weights. :mod:`topkconv.report` then writes
``<out>/reports/<table>.md``, ``.csv`` and ``.json`` and prints the table.

Under ``torchrun`` every rank trains (the trainer shards the batches with DDP), then every rank attacks
its share of the examples (:func:`topkconv.evaluate.evaluate` gathers them); rank 0 alone writes.
Figures and routing statistics (:func:`run_figures`) run on rank 0 from Table III's models.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .config import RunSpec, from_dict, spec_from_dict
from .io import atomic_write_json, environment_info, read_toml

TABLES = ("table1", "table2", "table3")
TARGETS = TABLES + ("figures", "all")
PRESETS = ("quick", "paper")


@dataclass
class ColumnSpec:
    label: str = ""                       # the paper's name for the column (or row of Table II)
    spec: dict = field(default_factory=dict)  # overrides merged into the table's base RunSpec
    not_reproduced: Optional[str] = None  # the reason, when the paper gives too little to rebuild it
    prune_from: Optional[str] = None      # label of the column whose trained model is pruned


@dataclass
class FiguresSpec:
    feature_max: str = "TKC-max"          # Figure 3: column whose TopKConv layers use the max criterion
    feature_sum: str = "TKC-sum"          # Figure 3: the same with the sum criterion
    gradcam: list = field(default_factory=lambda: ["Baseline", "Dynamic-k"])  # Figure 4 columns
    n_images: int = 4                     # test images shown in Figures 3 and 4
    gradcam_eps: Optional[float] = None   # eps (0-255) of the PGD images in Figure 4; None: largest in the spec
    routing: list = field(default_factory=list)  # columns whose routing layers get statistics
    routing_examples: Optional[int] = None  # test examples for the routing statistics; None: all
    routing_batch_size: int = 64          # Dynamic-k selections materialise batch x out x in products


@dataclass
class TableSpec:
    table: str = ""                       # table1 | table2 | table3
    preset: str = ""                      # quick | paper
    title: str = ""
    note: str = ""                        # printed under the table (e.g. why a larger eps is reported)
    eval_examples: Optional[int] = None   # test images for the paper's FGSM and PGD (None: the whole test set)
    strong_eps: Optional[list] = None     # radii (0-255) of the strong suite on attack.n_examples; None: attack.eps
    threads: Optional[int] = None         # torch intra-op threads while this table runs; None: torch's default
    base: dict = field(default_factory=dict)
    columns: list = field(default_factory=list)
    figures: Optional[dict] = None
    path: str = ""                        # where the spec was read from (set by the loader)

    def column(self, label: str) -> ColumnSpec:
        for column in self.columns:
            if column.label == label:
                return column
        raise ValueError(f"{self.path}: no column labelled {label!r}; columns are "
                         f"{[c.label for c in self.columns]}")

    def figures_spec(self) -> FiguresSpec:
        return from_dict(FiguresSpec, self.figures or {}, "figures")

    def run_spec(self, label: str, overrides: Optional[dict] = None) -> RunSpec:
        """The RunSpec of column ``label``: base, then the column's overrides, then ``overrides``."""
        column = self.column(label)
        merged = merge(self.base, column.spec)
        if overrides:
            merged = merge(merged, overrides)
        merged.setdefault("name", f"{self.table}-{self.preset}-{label}")
        try:
            return spec_from_dict(merged)
        except ValueError as err:
            raise ValueError(f"{self.path}: column {label!r}: {err}") from None


def merge(base: dict, overrides: dict) -> dict:
    """Deep merge: tables merge key by key, anything else in ``overrides`` replaces the base value."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def experiments_dir() -> Path:
    """``./experiments`` when it exists (a clone, or a user's own specs), else the one beside the source."""
    here = Path.cwd() / "experiments"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[2] / "experiments"


def spec_path(table: str, preset: str) -> Path:
    if table not in TABLES:
        raise ValueError(f"table must be one of {TABLES}, got {table!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    return experiments_dir() / f"{table}-{preset}.toml"


def load_table_spec(path) -> TableSpec:
    """Read and check a table spec; every error names the file and the offending key."""
    path = Path(path)
    raw = read_toml(path, "experiment spec")
    try:
        spec = from_dict(TableSpec, raw)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    spec.path = str(path)
    if spec.table not in TABLES:
        raise ValueError(f"{path}: key 'table' must be one of {TABLES}, got {spec.table!r}")
    if spec.preset not in PRESETS:
        raise ValueError(f"{path}: key 'preset' must be one of {PRESETS}, got {spec.preset!r}")
    if not isinstance(spec.base, dict):
        raise ValueError(f"{path}: key 'base' must be a table (a RunSpec), got {spec.base!r}")
    columns = []
    for i, raw_column in enumerate(spec.columns):
        try:
            column = from_dict(ColumnSpec, raw_column, f"columns[{i}]")
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        if not column.label:
            raise ValueError(f"{path}: key 'columns[{i}].label' is missing or empty")
        columns.append(column)
    if not columns:
        raise ValueError(f"{path}: key 'columns' is empty; a table needs at least one column")
    labels = [c.label for c in columns]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{path}: key 'columns': labels repeat: {labels}")
    spec.columns = columns
    for column in columns:
        if column.prune_from is not None and column.prune_from not in labels:
            raise ValueError(f"{path}: key 'columns.prune_from' of {column.label!r} names "
                             f"{column.prune_from!r}, which is not a column ({labels})")
        if column.not_reproduced is None:
            spec.run_spec(column.label)  # validates the merged RunSpec now, not mid-run
    if spec.threads is not None and (not isinstance(spec.threads, int) or spec.threads < 1):
        raise ValueError(f"{path}: key 'threads' must be a positive int, got {spec.threads!r}")
    if spec.figures is not None:
        try:
            figures = spec.figures_spec()
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        for label in [figures.feature_max, figures.feature_sum, *figures.gradcam, *figures.routing]:
            if label not in labels:
                raise ValueError(f"{path}: key 'figures' names column {label!r}, which is not one of {labels}")
    return spec


# ---------------------------------------------------------------- training and evaluation, cached

def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _log(message: str) -> None:
    if _rank() == 0:
        print(message, file=sys.stderr, flush=True)


def cli_overrides(data: Optional[str] = None, pretrained: Optional[str] = None) -> dict:
    """RunSpec overrides from ``--data`` and ``--pretrained``: they change the hash, as they should."""
    overrides: dict = {}
    if data is not None:
        overrides["data"] = {"root": str(data)}
    if pretrained is not None:
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"--pretrained: {pretrained} is not a file (expected torchvision's "
                                    f"vgg16-397923af.pth)")
        overrides["model"] = {"pretrained": str(pretrained)}
    return overrides


def run_dir_for(spec: RunSpec, runs_dir) -> Path:
    return Path(runs_dir) / spec.hash()


def is_trained(run_dir: Path) -> bool:
    return (run_dir / "model.safetensors").is_file() and (run_dir / "run.json").is_file()


class Refresh:
    """``--force``: redo each run (or evaluation) once per invocation, however many tables share it."""

    def __init__(self, enabled: bool):
        self.enabled = bool(enabled)
        self.done: set = set()

    def __call__(self, key) -> bool:
        if not self.enabled or str(key) in self.done:
            return False
        self.done.add(str(key))
        return True


def _refresh(force) -> Refresh:
    return force if isinstance(force, Refresh) else Refresh(force)


def train_column(table: TableSpec, label: str, runs_dir, overrides: dict, force: Refresh,
                 progress: bool, log: list) -> Optional[Path]:
    """Train column ``label`` unless ``runs/<hash>/`` already holds it; returns its run folder."""
    column = table.column(label)
    if column.not_reproduced is not None:
        return None
    spec = table.run_spec(label, overrides)
    run_dir = run_dir_for(spec, runs_dir)
    if is_trained(run_dir) and not force(run_dir):
        log.append({"column": label, "run": run_dir.name, "action": "cached"})
        _log(f"[{table.table}] {label}: cached model {run_dir}")
        return run_dir
    start = time.perf_counter()
    if column.prune_from is not None:
        from . import pruning

        source_dir = train_column(table, column.prune_from, runs_dir, overrides, force, progress, log)
        _log(f"[{table.table}] {label}: pruning {source_dir.name} -> {run_dir}")
        pruning.prune_run(source_dir, spec, run_dir, progress=progress)
    else:
        from . import train

        _log(f"[{table.table}] {label}: training -> {run_dir}")
        train.fit(spec, run_dir, progress=progress)
    force.done.add(str(run_dir))  # fresh now: later tables of this invocation reuse it
    log.append({"column": label, "run": run_dir.name, "action": "trained",
                "seconds": round(time.perf_counter() - start, 1)})
    return run_dir


def strong_radii(table: TableSpec, spec: RunSpec) -> list:
    return list(table.strong_eps) if table.strong_eps is not None else [spec.attack.eps]


def attack_configs(table: TableSpec, spec: RunSpec) -> dict:
    """The evaluations of one column: the paper's FGSM and PGD (at every eps) on ``eval_examples`` test
    images, and the strong suite at each of ``strong_eps`` on the first ``attack.n_examples``."""
    configs = {"paper": dataclasses.replace(spec.attack, suite="paper", n_examples=table.eval_examples)}
    if spec.attack.suite == "full":
        for eps in strong_radii(table, spec):
            # the paper's step/eps ratio (0.75 at 8), so PGD reaches the larger radius as it does 8/255
            step = spec.attack.pgd_step_size * float(eps) / spec.attack.eps
            configs[f"strong@{eps:g}"] = dataclasses.replace(spec.attack, eps=float(eps), extra_eps=[],
                                                            pgd_step_size=step)
    return configs


def evaluate_column(table: TableSpec, spec: RunSpec, run_dir: Path, test: tuple, surrogate_dir: Optional[Path],
                    force: Refresh, progress: bool, log: list, label: str) -> dict:
    """Attack one trained model: ``{"paper": eval dict, "strong": {eps: eval dict}}``.

    The paper suite goes to ``eval.json`` (with ``acc-vs-eps.png``), each strong suite to
    ``eval-strong-<eps>.json``; a file made with the same attack config, data and surrogate is reused.
    """
    from .checkpoint import load_checkpoint
    from .evaluate import evaluate, write_results

    model = surrogate = None
    out: dict = {"paper": None, "strong": {}}
    for name, cfg in attack_configs(table, spec).items():
        path = run_dir / ("eval.json" if name == "paper" else f"eval-{name.replace('@', '-')}.json")
        key = {"attack": dataclasses.asdict(cfg), "data": dataclasses.asdict(spec.data),
               "surrogate": _weights_id(surrogate_dir) if surrogate_dir is not None and name != "paper" else None,
               "model": _weights_id(run_dir)}
        cached = None if force(path) else _read_json(path)
        if cached is not None and cached.get("reproduce_key") == key:
            result = cached
            log.append({"column": label, "run": run_dir.name, "action": f"{name} cached"})
        else:
            if model is None:
                device = _device(spec)
                model = load_checkpoint(run_dir, device=device)[0]
                if surrogate_dir is not None:
                    surrogate = load_checkpoint(surrogate_dir, device=device)[0]
            _log(f"  {label}: {name} attacks (n = {cfg.n_examples or len(test[0])})")
            start = time.perf_counter()
            result = evaluate(model, test[0], test[1], cfg, surrogate=surrogate if name != "paper" else None,
                              progress=progress)
            result["reproduce_key"] = key
            result["run"] = {"dir": str(run_dir), "name": spec.name, "hash": spec.hash(), "column": label}
            if _rank() == 0:
                if name == "paper":
                    write_results(result, path, title=f"{label} ({table.table}, {table.preset})")
                else:
                    atomic_write_json(path, result)
            log.append({"column": label, "run": run_dir.name, "action": f"{name} evaluated",
                        "seconds": round(time.perf_counter() - start, 1)})
        if name == "paper":
            out["paper"] = result
        else:
            out["strong"][name.split("@", 1)[1]] = result
    return out


def _weights_id(run_dir: Path) -> list:
    """Which weights were attacked: a retrained model (``--force``) invalidates its evaluations."""
    stat = (Path(run_dir) / "model.safetensors").stat()
    return [Path(run_dir).name, stat.st_size, stat.st_mtime_ns]


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _device(spec: RunSpec) -> str:
    from .distributed import pick_device

    return str(pick_device(spec.train.device, int(os.environ.get("LOCAL_RANK", "0"))))


_TEST_CACHE: dict = {}


def test_limit(table: TableSpec, spec: RunSpec) -> Optional[int]:
    """How many test images the evaluations need: big test sets at 224 px do not fit in memory whole."""
    if table.eval_examples is None:
        return None
    return max(table.eval_examples, spec.attack.n_examples or 0)


def test_tensors(spec: RunSpec, limit: Optional[int] = None) -> tuple:
    """The first ``limit`` test images as tensors in [0, 1], loaded once per data config and limit."""
    key = (json.dumps(dataclasses.asdict(spec.data), sort_keys=True), limit)
    if key not in _TEST_CACHE:
        from .data import load_data

        splits = load_data(spec.data)
        _TEST_CACHE[key] = (splits.test_tensors(limit=limit), splits)
    (x, y), splits = _TEST_CACHE[key]
    return x, y, splits


def report_meta(table: TableSpec, spec: RunSpec, n_test: int, seconds: float, log: list) -> dict:

    env = environment_info()
    data = spec.data.name + (f" ({spec.data.root})" if spec.data.root else " (embedded)")
    trained = sum(1 for entry in log if entry["action"] == "trained")
    hardware = f"{env['device']}, {env['cpu_count']} CPU cores, {env['torch_threads']} torch threads"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        hardware += f", {world} processes (torchrun)"
    attack = spec.attack
    strong = f"first {attack.n_examples}" if attack.n_examples else "all"
    return {
        "preset": f"{table.preset} (spec {table.path})",
        "data": f"{data}, {spec.data.image_size} px, {n_test} test images",
        "model": f"{spec.model.arch}, width {spec.model.width}, hidden {spec.model.hidden}, "
                 f"{spec.train.epochs} epochs, "
                 + (f"features initialised from {spec.model.pretrained}" if spec.model.pretrained
                    else "random init (the paper started from ImageNet weights)" if spec.model.arch == "vgg16"
                    else "random init"),
        "attacks": f"L-inf eps {', '.join(f'{e:g}' for e in [attack.eps, *attack.extra_eps])} /255; "
                   f"FGSM and PGD {attack.pgd_steps} x {attack.pgd_step_size:g}/255 (the step scaled with eps) on "
                   f"{f'the first {table.eval_examples}' if table.eval_examples else 'all'} test images; "
                   f"strong suite ({attack.suite}) on the {strong} test images",
        "seeds": f"train {spec.train.seed}, data split {spec.data.split_seed}, attacks {attack.seed}",
        "hardware": f"{hardware}; torch {env['torch']}; {env['platform']}",
        "commit": env.get("git_commit") or "unknown",
        "wall time": f"{seconds:.0f} s ({trained} models trained, the rest cached)",
    }


def eps_list(spec: RunSpec) -> list:
    return [spec.attack.eps, *spec.attack.extra_eps]


def build_report_table(table: TableSpec, results: dict, spec: RunSpec):
    from . import report

    labels = [c.label for c in table.columns]
    not_reproduced = {c.label: c.not_reproduced for c in table.columns if c.not_reproduced is not None}
    notes = [table.note] if table.note else []
    if table.table == "table2":
        return report.pruning_table(table.title or "Table II", labels, results, spec.attack.eps, notes,
                                    eps_list(spec), strong_radii(table, spec) if spec.attack.suite == "full" else [])
    return report.attack_table(table.table, table.title or table.table, labels, results, eps_list(spec),
                               not_reproduced, notes, strong_radii(table, spec) if spec.attack.suite == "full" else [])


def run_table(table: TableSpec, out, overrides: dict, force=False, progress: bool = True) -> dict:
    """Train (all ranks), then attack and report (rank 0) every column of one table."""
    force = _refresh(force)
    from . import report

    start = time.perf_counter()
    runs_dir = Path(out) / "runs"
    reports_dir = Path(out) / "reports"
    log: list = []
    run_dirs = {}
    for column in table.columns:
        run_dirs[column.label] = train_column(table, column.label, runs_dir, overrides, force, progress, log)
    first_spec = table.run_spec(first_label(table), overrides)
    from . import distributed

    # Under torchrun every rank attacks its share of the examples (evaluate gathers the results).
    ctx = distributed.setup(first_spec.train.device)
    try:
        x, y, _ = test_tensors(first_spec, test_limit(table, first_spec))
        surrogate_label = "Baseline" if run_dirs.get("Baseline") is not None else None
        results = {}
        for column in table.columns:
            run_dir = run_dirs[column.label]
            if run_dir is None:
                continue
            spec = table.run_spec(column.label, overrides)
            surrogate = run_dirs[surrogate_label] if surrogate_label and surrogate_label != column.label else None
            results[column.label] = evaluate_column(table, spec, run_dir, (x, y), surrogate, force, progress,
                                                    log, column.label)
    finally:
        distributed.teardown(ctx)
    if _rank() != 0:
        return {"table": table.table, "log": log}
    seconds = time.perf_counter() - start
    table_out = build_report_table(table, results, first_spec)
    meta = report_meta(table, first_spec, len(x), seconds, log)
    paths = report.write_table(reports_dir, table_out, meta)

    atomic_write_json(reports_dir / f"{table.table}.json",
                      {"meta": meta, "log": log, "runs": {k: (v.name if v else None) for k, v in run_dirs.items()},
                       "results": results})
    print(report.render_console(table_out), flush=True)
    return {"table": table.table, "paths": paths, "log": log, "results": results, "seconds": seconds}


def run_figures(table: TableSpec, out, overrides: dict, force=False, progress: bool = True) -> dict:
    """Figures 3 and 4 and the routing statistics, from the models of ``table`` (Table III's spec)."""
    force = _refresh(force)
    from . import figures
    from .checkpoint import load_checkpoint

    if table.figures is None:
        raise ValueError(f"{table.path}: has no [figures] section; figures need Table III's spec")
    fig = table.figures_spec()
    runs_dir = Path(out) / "runs"
    reports_dir = Path(out) / "reports"
    log: list = []
    needed = list(dict.fromkeys([fig.feature_max, fig.feature_sum, *fig.gradcam, *fig.routing]))
    run_dirs = {label: train_column(table, label, runs_dir, overrides, force, progress, log) for label in needed}
    if _rank() != 0:
        return {"log": log}
    spec = table.run_spec(needed[0], overrides)
    device = _device(spec)
    models = {label: load_checkpoint(run_dirs[label], device=device)[0].eval() for label in needed}
    limit = None if fig.routing_examples is None else max(fig.routing_examples, 64, fig.n_images)
    x, y, splits = test_tensors(spec, limit)
    names = list(getattr(splits, "classes", None) or []) or None
    paths = {}
    n = min(fig.n_images, len(x))
    _log("[figures] Figure 3: feature maps")
    paths["figure3"] = figures.figure3_feature_maps(models[fig.feature_max], models[fig.feature_sum], x[:n],
                                                    reports_dir / "figure3.png")
    _log("[figures] Figure 4: GradCAM on adversarial images")
    paths["figure4"] = figure4(fig, spec, models, x, y, reports_dir / "figure4.png", names)
    _log("[figures] routing statistics")
    limit = fig.routing_examples or len(x)
    routes = {label: figures.collect_routes(models[label], x[:limit], y[:limit], spec.model.num_classes,
                                            batch_size=fig.routing_batch_size)
              for label in fig.routing}
    meta = {"preset": f"{table.preset} (spec {table.path})",
            "data": f"{spec.data.name}, {min(limit, len(x))} test images",
            "models": ", ".join(f"{label} = runs/{run_dirs[label].name}" for label in fig.routing)}
    paths["routing"] = figures.routing_report(routes, reports_dir, names, meta)
    for name, path in paths.items():
        print(f"{name}: {path}", flush=True)
    return {"paths": paths, "log": log}


def figure4(fig: FiguresSpec, spec: RunSpec, models: dict, x, y, path, class_names) -> str:
    """PGD each GradCAM model on its own; show images the first model (the baseline) gets wrong."""
    import torch

    from . import figures
    from .attacks import pgd

    eps = (fig.gradcam_eps if fig.gradcam_eps is not None else max(eps_list(spec))) / 255.0
    # the paper's step (0.75 at eps 8) scaled with eps, so a larger radius is reached as the paper's is
    step = spec.attack.pgd_step_size / 255.0 * (eps * 255.0 / spec.attack.eps)
    pool = min(len(x), max(64, fig.n_images))
    device = next(models[fig.gradcam[0]].parameters()).device
    xs, ys = x[:pool].to(device), y[:pool].to(device)
    generator = torch.Generator().manual_seed(spec.attack.seed)
    adversarial = {label: pgd(models[label], xs, ys, eps, step, spec.attack.pgd_steps, generator=generator)
                   for label in fig.gradcam}
    first = models[fig.gradcam[0]]
    with torch.no_grad():
        fooled = (first(adversarial[fig.gradcam[0]]).argmax(1) != ys).nonzero().flatten()
    chosen = torch.tensor(list(dict.fromkeys(fooled.tolist() + list(range(pool))))[:fig.n_images], device=device)
    return figures.figure4_gradcam({label: models[label] for label in fig.gradcam}, xs[chosen].cpu(),
                                   ys[chosen].cpu(), {label: adv[chosen] for label, adv in adversarial.items()},
                                   path, class_names)



def reproduce(target: str = "table3", preset: str = "quick", data: Optional[str] = None,
              pretrained: Optional[str] = None, out=".", force: bool = False, progress: bool = True,
              spec_file: Optional[str] = None, overrides: Optional[dict] = None) -> dict:
    """``topkconv reproduce``: one table, the figures, or ``all``. Returns what each step did.

    ``spec_file`` replaces ``experiments/<table>-<preset>.toml`` (for one table, or for the figures,
    which use Table III's models). ``overrides`` (a RunSpec dict) is merged into every column.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    overrides = merge(cli_overrides(data, pretrained), overrides or {})
    force = Refresh(force)
    steps = list(TABLES) + ["figures"] if target == "all" else [target]
    done = {}
    for step in steps:
        source = spec_file if spec_file is not None else spec_path("table3" if step == "figures" else step, preset)
        table = load_table_spec(source)
        if step != "figures" and table.table != step:
            raise ValueError(f"{source}: key 'table' is {table.table!r}, but {step!r} was asked for")
        with torch_threads(table.threads), process_group(table.run_spec(first_label(table), overrides)):
            if step == "figures":
                done[step] = run_figures(table, out, overrides, force, progress)
            else:
                done[step] = run_table(table, out, overrides, force, progress)
    return done


def first_label(table: TableSpec) -> str:
    return next(c.label for c in table.columns if c.not_reproduced is None)


@contextlib.contextmanager
def process_group(spec: RunSpec):
    """Under torchrun, join the process group once for a whole table: every fit, prune and evaluation
    inside then shares it (one rendezvous per run, not one per model)."""
    from . import distributed

    ctx = distributed.setup(spec.train.device)
    try:
        yield ctx
    finally:
        distributed.teardown(ctx)


@contextlib.contextmanager
def torch_threads(threads: Optional[int]):
    """Run with ``threads`` intra-op threads, then restore. The quick preset's models are so small that
    a second thread barely helps, and on a shared machine idle-spinning threads cost several times more."""
    import torch

    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- k sweep

SWEEP_TARGETS = {"conv": ("TKC-max", "conv_k"), "fc": ("Dynamic-k", "fc_k")}


def sweep(ks: list, layer: str = "conv", preset: str = "quick", column: Optional[str] = None,
          data: Optional[str] = None, pretrained: Optional[str] = None, out=".", force: bool = False,
          progress: bool = True, spec_file: Optional[str] = None, overrides: Optional[dict] = None) -> dict:
    """Train and attack one Table III column for every k; report clean and robust accuracy against k.

    ``layer="conv"`` sets ``defense.conv_k`` (default column TKC-max); ``layer="fc"`` sets every
    Dynamic-k layer's k (``defense.fc_k``, default column Dynamic-k). A k is a count or a fraction.
    """
    if layer not in SWEEP_TARGETS:
        raise ValueError(f"--layer must be one of {sorted(SWEEP_TARGETS)}, got {layer!r}")
    if not ks:
        raise ValueError("--k: give at least one k value")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, float)) or k <= 0:
            raise ValueError(f"--k: expected positive counts or fractions in (0, 1], got {k!r}")
    default_column, key = SWEEP_TARGETS[layer]
    force = Refresh(force)
    column = column or default_column
    table = load_table_spec(spec_file if spec_file is not None else spec_path("table3", preset))
    base_overrides = merge(cli_overrides(data, pretrained), overrides or {})
    with torch_threads(table.threads), process_group(table.run_spec(column, base_overrides)):
        return _sweep(table, ks, layer, column, key, base_overrides, out, force, progress)


def _sweep(table: TableSpec, ks: list, layer: str, column: str, key: str, base_overrides: dict, out,
           force: Refresh, progress: bool) -> dict:
    from . import report
    from .figures import _matplotlib, save_figure

    runs_dir = Path(out) / "runs"
    start = time.perf_counter()
    log: list = []
    points = []
    for k in ks:
        fc_layers = len(table.run_spec(column, base_overrides).model.defense.fc_k)
        value = k if layer == "conv" else [k] * fc_layers
        overrides = merge(base_overrides, {"model": {"defense": {key: value}}})
        spec = table.run_spec(column, overrides)
        run_dir = run_dir_for(spec, runs_dir)
        if force(run_dir) or not is_trained(run_dir):
            from . import train

            _log(f"[sweep] {column} {key}={value}: training -> {run_dir}")
            train.fit(spec, run_dir, progress=progress)
            log.append({"k": k, "run": run_dir.name, "action": "trained"})
        points.append((k, spec, run_dir))
    from . import distributed

    ctx = distributed.setup(points[0][1].train.device)
    try:
        x, y, _ = test_tensors(points[0][1], test_limit(table, points[0][1]))
        results = [evaluate_column(table, spec, run_dir, (x, y), None, force, progress, log, f"k={k}")
                   for k, spec, run_dir in points]
    finally:
        distributed.teardown(ctx)
    if _rank() != 0:
        return {"log": log}
    rows = []
    eps = points[0][1].attack.eps
    extra = points[0][1].attack.extra_eps
    for (k, spec, run_dir), result in zip(points, results):
        row = {"k": k, "run": run_dir.name, "clean": report.clean_accuracy(result)}
        for e in [eps, *extra]:
            row[f"fgsm@{e:g}"] = report.attack_accuracy(result, "fgsm", e)
            row[f"pgd@{e:g}"] = report.attack_accuracy(result, "pgd", e)
        for e in strong_radii(table, spec):
            row[f"worst@{e:g}"] = report.worst_case(result, e)
        row["masking flags"] = ", ".join(report.masking_flags(result)) or "none"
        rows.append(row)
    header = list(rows[0])
    table_out = report.Table(f"sweep-{layer}", f"k sweep: {column}, {key} (preset {table.preset})",
                             header, [[row[h] for h in header] for row in rows])
    meta = report_meta(table, points[0][1], len(x), time.perf_counter() - start, log)
    reports_dir = Path(out) / "reports"
    paths = report.write_table(reports_dir, table_out, meta)
    atomic_write_json(reports_dir / f"sweep-{layer}.json", {"meta": meta, "rows": rows})
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ks_axis = [row["k"] for row in rows]
    for name in [h for h in header if h == "clean" or "@" in h]:
        values = [row[name] for row in rows]
        if any(v is not None for v in values):
            ax.plot(ks_axis, [float("nan") if v is None else v for v in values], marker="o", label=name)
    ax.set_xlabel(f"k ({key})")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(table_out.title, fontsize=9)
    ax.legend(fontsize=7)
    paths["png"] = save_figure(fig, reports_dir / f"sweep-{layer}.png")
    print(report.render_console(table_out), flush=True)
    return {"paths": paths, "rows": rows, "log": log}
