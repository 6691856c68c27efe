"""The table-spec format (``topkconv/experiments/<table>-<preset>.toml``, package data) and :class:`Study`,
the one place a run's spec is built.

A table spec names the table, a ``base`` RunSpec and a list of ``columns``; each column is the base with
its own overrides merged in (``[columns.spec]``), so a column says only how it differs. A column may
instead be marked ``not_reproduced`` with the reason, or be a pruned copy of another column
(``prune_from``). ``seeds`` is how many training seeds each column gets: seed i trains with
``train.seed = base train.seed + i``, which changes the initialisation, the batch order and the
augmentation; the data split (``data.split_seed``) stays fixed, so every seed is tested on the same
examples. Columns have roles by declaration, never by label: ``surrogate`` names the column whose model
(same seed) is the strong suite's transfer source, ``sweep_columns`` the columns ``sweep`` varies by default.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import AttackConfig, RunSpec, attack_config_with, from_dict, spec_from_dict
from ..io import read_toml

PAPER_TABLES = ("table1", "table2", "table3")  # the paper's tables: what `reproduce all` makes
# tableat: the project's own adversarial-training table (no paper numbers; its claims are the project's
# questions). A target of its own, left out of `all` (see experiments/tableat-quick.toml for why).
TABLES = PAPER_TABLES + ("tableat",)
TARGETS = TABLES + ("figures", "all")
PRESETS = ("quick", "paper", "fashion", "cifar10")  # = the --preset choices in cli.py (a test checks)


@dataclass
class ColumnSpec:
    label: str = ""                       # the paper's name for the column (or row of Table II)
    spec: dict = field(default_factory=dict)  # overrides merged into the table's base RunSpec
    not_reproduced: Optional[str] = None  # the reason, when the paper gives too little to rebuild it
    prune_from: Optional[str] = None      # label of the column whose trained model is pruned
    strong_attack: dict = field(default_factory=dict)  # this column's strong suite only, over the table's
                                          # [strong_attack]: e.g. a larger EOT budget for the stochastic column
                                          # alone, so the other columns keep their cache keys


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
    table: str = ""                       # one of TABLES
    preset: str = ""                      # one of PRESETS
    title: str = ""
    note: str = ""                        # printed under the table (e.g. why a larger eps is reported)
    seeds: int = 3                        # training seeds per column (each its own cached run)
    eval_examples: Optional[int] = None   # test images for the paper's FGSM and PGD (None: the whole test set)
    strong_eps: Optional[list] = None     # radii (0-255) of the strong suite on attack.n_examples; None: attack.eps
    strong_attack: dict = field(default_factory=dict)  # an [attack] table for the strong suite only, e.g. a larger
                                          # EOT budget that the paper suite's many images could not afford
    threads: Optional[int] = None         # torch intra-op threads of an in-process run; None: torch's default
    surrogate: Optional[str] = None       # column whose model (same seed) is the strong suite's transfer source
    sweep_columns: Optional[list] = None  # columns `topkconv sweep` varies by default; None: every reproduced one
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

    @property
    def labels(self) -> list:
        return [c.label for c in self.columns]

    @property
    def reproduced_labels(self) -> list:
        return [c.label for c in self.columns if c.not_reproduced is None]

    def strong_overrides(self, label: str) -> dict:
        """The [attack] keys that column ``label``'s strong suite changes: the table's, then the column's."""
        return merge(self.strong_attack, self.column(label).strong_attack)

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
    """The shipped specs and claims: package data (``topkconv/experiments``), installed with the package.

    Never looked up from the working directory: a folder that happens to be called ``experiments`` there
    must not change what ``reproduce`` runs. A user's own spec is given with ``--spec FILE``.
    """
    return Path(__file__).resolve().parents[1] / "experiments"


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
    check_seeds(spec.seeds, f"{path}: key 'seeds'")
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
    for where, table in [("strong_attack", spec.strong_attack),
                         *[(f"columns[{i}].strong_attack", c.strong_attack) for i, c in enumerate(columns)]]:
        if not isinstance(table, dict):
            raise ValueError(f"{path}: key {where!r} must be a table (an [attack] table), got {table!r}")
    for column in columns:
        if column.prune_from is not None and column.prune_from not in labels:
            raise ValueError(f"{path}: key 'columns.prune_from' of {column.label!r} names "
                             f"{column.prune_from!r}, which is not a column ({labels})")
        if column.not_reproduced is None:
            run = spec.run_spec(column.label)  # validates the merged RunSpec now, not mid-run
            try:  # and the strong suite's overrides on its attack
                attack_config_with(run.attack, spec.strong_overrides(column.label), "strong_attack")
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
    _check_roles(spec, path)
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


def _check_roles(spec: TableSpec, path: Path) -> None:
    """The columns named by role (``surrogate``, ``sweep_columns``) are reproduced columns of the spec."""
    reproduced = spec.reproduced_labels
    if spec.surrogate is not None and spec.surrogate not in reproduced:
        raise ValueError(f"{path}: key 'surrogate' names {spec.surrogate!r}, which is not a reproduced column "
                         f"({reproduced})")
    if spec.sweep_columns is not None:
        if not isinstance(spec.sweep_columns, list) or not spec.sweep_columns:
            raise ValueError(f"{path}: key 'sweep_columns' must be a non-empty list of column labels")
        for label in spec.sweep_columns:
            if label not in reproduced:
                raise ValueError(f"{path}: key 'sweep_columns' names {label!r}, which is not a reproduced column "
                                 f"({reproduced})")


def check_seeds(seeds, where: str) -> int:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"{where} must be a positive number of seeds, got {seeds!r}")
    return seeds


@dataclass
class Study:
    """One table as it will run: the spec, the command line's overrides and the number of seeds.

    Every RunSpec and attack config of a run is built here, from these three, and nowhere else.
    """
    table: TableSpec
    overrides: dict = field(default_factory=dict)
    seeds: Optional[int] = None          # None: the table spec's own

    def __post_init__(self):
        self.seeds = check_seeds(self.table.seeds if self.seeds is None else self.seeds, "--seeds")

    @property
    def name(self) -> str:
        return self.table.table

    def run_spec(self, label: str, seed: int = 0) -> RunSpec:
        """Column ``label`` trained with seed index ``seed`` (``train.seed`` = the base's + ``seed``)."""
        spec = self.table.run_spec(label, self.overrides)
        if seed:
            spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, seed=spec.train.seed + seed))
        return spec

    @property
    def first_spec(self) -> RunSpec:
        return self.run_spec(self.table.reproduced_labels[0])

    def eps_list(self) -> list:
        """Radii (0-255) of the paper's FGSM and PGD: the paper's eps first, then the spec's extra ones."""
        attack = self.first_spec.attack
        return [attack.eps, *[e for e in attack.extra_eps if e != attack.eps]]

    def strong_radii(self) -> list:
        """Radii (0-255) of the strong suite; empty when the spec runs the paper suite only."""
        attack = self.first_spec.attack
        if attack.suite != "full":
            return []
        return [float(e) for e in (self.table.strong_eps if self.table.strong_eps is not None else [attack.eps])]

    def attack_configs(self, spec: RunSpec, label: str) -> dict:
        """The evaluations of one run of column ``label``: the paper's FGSM and PGD (at every eps) on
        ``eval_examples`` test images (``"paper"``), and the strong suite at each strong radius on the first
        ``attack.n_examples`` (``"strong@<eps>"``), with the table's and the column's [strong_attack]."""
        configs = {"paper": dataclasses.replace(spec.attack, suite="paper", n_examples=self.table.eval_examples)}
        if spec.attack.suite == "full":
            radii = self.strong_radii()
            overrides = self.table.strong_overrides(label)
            strong = (attack_config_with(spec.attack, overrides, "strong_attack")
                      if overrides else spec.attack)   # unchanged configs keep their cache keys
            for eps in radii:
                # One eps curve per model is enough (accuracy must fall to chance as eps grows): it runs with
                # the largest strong radius only, not again at each.
                curve = strong.eps_curve if eps == max(radii) else []
                configs[f"strong@{eps:g}"] = dataclasses.replace(strong_config(strong, eps), eps_curve=curve)
        return configs

    def test_limit(self) -> Optional[int]:
        """How many test images the evaluations need: big test sets at 224 px do not fit in memory whole."""
        if self.table.eval_examples is None:
            return None
        return max(self.table.eval_examples, self.first_spec.attack.n_examples or 0)


def strong_config(attack: AttackConfig, eps: float) -> AttackConfig:
    """The strong suite at ``eps``, with the paper's step/eps ratio (0.75 at 8) so PGD reaches a larger
    radius as it reaches 8/255."""
    step = attack.budget("pgd").step_size * float(eps) / attack.eps
    return dataclasses.replace(attack.with_budget("pgd", step_size=step), eps=float(eps), extra_eps=[])


def display_path(path) -> str:
    """A file named for a report: relative to the working folder or to the project, never absolute."""
    path = Path(path).resolve()
    for root in (Path.cwd(), experiments_dir().resolve().parent):
        try:
            return path.relative_to(root.resolve()).as_posix()
        except ValueError:
            continue
    return path.name
