"""Reproduce the paper's tables and figures from the experiment specs in ``experiments/*.toml``.

A table spec (``experiments/<table>-<preset>.toml``) names the table, a ``base`` RunSpec and a list of
``columns``; each column is the base with its own overrides merged in (``[columns.spec]``), so a
column says only how it differs. A column may instead be marked ``not_reproduced`` with the reason,
or be a pruned copy of another column (``prune_from``).

:func:`reproduce` trains every column (cached by ``RunSpec.hash()`` under ``<out>/runs/<hash>/``),
attacks it (cached as ``eval.json`` next to the weights, keyed by the attack config), and writes the
reports through :mod:`topkconv.report`. Under ``torchrun`` every rank trains (the trainer shards the
batches with DDP) and rank 0 alone evaluates and writes reports, after all training is done, so no
rank waits in a collective while rank 0 attacks.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .config import AttackConfig, RunSpec, from_dict, spec_from_dict

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


@dataclass
class TableSpec:
    table: str = ""                       # table1 | table2 | table3
    preset: str = ""                      # quick | paper
    title: str = ""
    note: str = ""                        # printed under the table (e.g. why a larger eps is reported)
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
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment spec {path} not found")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from None
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
    if spec.figures is not None:
        try:
            figures = spec.figures_spec()
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        for label in [figures.feature_max, figures.feature_sum, *figures.gradcam, *figures.routing]:
            if label not in labels:
                raise ValueError(f"{path}: key 'figures' names column {label!r}, which is not one of {labels}")
    return spec
