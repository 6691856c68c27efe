"""``topkconv sweep KEY VALUES...``: one table's columns over a grid of values of any spec key, over seeds.

``KEY`` is a dotted RunSpec key (``model.defense.conv_k``, ``model.width``, ``train.epochs``); each value is
read like a TOML value (``10`` is a count, ``0.1`` a fraction, ``[0.05, 0.1]`` a list, ``true``, or text).
Every (value, column) pair is checked, and its model built, before the first training. Each value is a
:class:`~.spec.Study` of the table with ``KEY = value`` merged into every chosen column, so every (value,
column, seed) is its own cached run. The report gives, per value and column, clean accuracy, the paper's
attacks and the strong suite's worst case with their 95% intervals (``reports/sweep-<key>.md/.csv/.json``),
the verdicts on the table's claims per value, and a plot (``.png``).

The columns are ``--columns``, else the spec's ``sweep_columns``, else every reproduced column. Before the
first job, every value is checked against every column: its spec and training config (``train.epochs 0``
fails here), its model, values given twice, and values that give the same runs and attacks (a key that
changes nothing). One process at a time writes ``out``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from typing import Optional

from ..errors import UserError, one_line
from . import claims as claims_module
from . import measures, tables
from .driver import cli_overrides, load_study, one_writer, run_plan, workers_for
from .spec import Study, merge
from .stats import Estimate
from .workspace import Workspace


def parse_value(text: str):
    """A value from the command line, read as TOML would: ``10`` int, ``0.1`` float, ``[1, 2]`` list,
    ``true`` bool; anything else is a string."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text


def nested(key: str, value) -> dict:
    """``"model.defense.conv_k", 0.1`` -> ``{"model": {"defense": {"conv_k": 0.1}}}``."""
    parts = key.split(".")
    if not key or any(not part for part in parts):
        raise ValueError(f"sweep: KEY must be a dotted spec key such as model.defense.conv_k, got {key!r}")
    out: dict = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        out = {part: out}
    return out


def _restricted(study: Study, columns: list) -> Study:
    """The study with only ``columns`` (and the columns they are pruned from)."""
    keep = list(columns)
    for label in columns:
        source = study.table.column(label).prune_from
        if source is not None and source not in keep:
            keep.append(source)
    table = dataclasses.replace(study.table, columns=[c for c in study.table.columns if c.label in keep])
    return Study(table, study.overrides, study.seeds)


def check_point(study: Study, label: str, where: str) -> tuple:
    """Build the RunSpec, check its training config and build the model of one (value, column): a bad value
    fails before any training. Returns what the value decides for the column: (run hash, attack configs)."""
    from ..models import build_model
    from ..train import check_train_config, resolve_spec
    from .workspace import test_tensors

    try:
        spec = study.run_spec(label)
        check_train_config(spec.train)
        _, _, splits = test_tensors(spec, 1)
        build_model(resolve_spec(spec, splits).model)
    except (ValueError, TypeError) as err:
        raise UserError(f"{where}: column {label!r}: {one_line(err)}") from None
    attacks = {name: dataclasses.asdict(cfg) for name, cfg in study.attack_configs(spec, label).items()}
    return spec.hash(), json.dumps(attacks, sort_keys=True)


def check_values(key: str, values: list, studies: list, labels: list) -> None:
    """Every value is checked against every column, and no two values give the same runs and attacks."""
    seen: dict = {}
    for value in values:
        text = json.dumps(value, sort_keys=True)
        if text in seen:
            raise UserError(f"sweep {key}: value {value!r} is given twice; give each value once")
        seen[text] = value
    for label in labels:
        decided: dict = {}
        for value, study in zip(values, studies):
            point = check_point(study, label, f"sweep {key}={value!r}")
            if point in decided:
                raise UserError(f"sweep {key}: values {decided[point]!r} and {value!r} give the same runs and attacks "
                                f"in column {label!r}: the key changes nothing there")
            decided[point] = value


def sweep(key: str, values: list, preset: str = "quick", columns: Optional[list] = None, table: str = "table3",
          data: Optional[str] = None, pretrained: Optional[str] = None, out=".", force: bool = False,
          progress: bool = True, spec_file: Optional[str] = None, overrides: Optional[dict] = None,
          seeds: Optional[int] = None, jobs: Optional[int] = None, claims_file=None, name: Optional[str] = None) -> dict:
    """Train and attack ``columns`` of ``table`` for every value of ``key``; see the module docstring."""
    if not values:
        raise UserError("sweep: give at least one value")
    values = [parse_value(v) if isinstance(v, str) else v for v in values]
    base = merge(cli_overrides(data, pretrained), overrides or {})
    first = load_study(table, preset, spec_file, base, seeds)
    labels = list(columns or first.table.sweep_columns or first.table.reproduced_labels)
    for label in labels:
        first.table.column(label)  # an unknown column is an error naming the spec and its columns
    studies = [_restricted(Study(first.table, merge(base, nested(key, value)), first.seeds), labels)
               for value in values]
    check_values(key, values, studies, labels)
    judged_claims = claims_module.load_claims(claims_file, {first.name: first.table},
                                              skip_missing_columns=claims_file is None and spec_file is not None)
    workers = workers_for(studies, jobs)
    with one_writer(out):
        return _sweep_in(Workspace(out, force), key, values, labels, studies, first, judged_claims, workers,
                         progress, name)


def _sweep_in(workspace: Workspace, key: str, values: list, labels: list, studies: list, first: Study,
              judged_claims: list, workers: int, progress: bool, name: Optional[str]) -> dict:
    """Run the sweep's plan in ``workspace`` and write its reports (the body of :func:`sweep`, under its lock)."""
    from .. import distributed
    from ..io import atomic_write_json, atomic_write_text

    log = run_plan(workspace, studies, [], workers, progress)
    if not distributed.context().is_main:
        return {"log": log}
    points = []
    for value, study in zip(values, studies):
        results = {label: seeds_ for label, seeds_ in workspace.results(study).items() if label in labels}
        summary = tables.summarise(study, results)
        verdicts = [claims_module.judge(c.for_preset(study.table.preset), results, study.eps_list(),
                                        study.strong_radii())
                    for c in judged_claims if c.table == study.name and c.a in results and c.b in results]
        points.append({"value": value, "summary": summary, "claims": verdicts,
                       "runs": {label: [s["run"] for s in seeds_] for label, seeds_ in results.items()}})
    slug = name or "sweep-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", key)
    reports = workspace.reports
    text = render_markdown(key, labels, points, first)
    atomic_write_text(reports / f"{slug}.md", text)
    atomic_write_text(reports / f"{slug}.csv", render_csv(key, points, first.seeds))
    atomic_write_json(reports / f"{slug}.json", {"key": key, "values": values, "columns": labels,
                                                 "seeds": first.seeds, "points": points,
                                                 "meta": tables.meta(studies[0])})
    measures_ = points[0]["summary"]["measures"]
    series = {m: {label: [p["summary"]["cells"][label][m] for p in points] for label in labels} for m in measures_}
    from .. import figures

    png = figures.sweep_plot(values, series, reports / f"{slug}.png",
                             title=f"{first.name} ({first.table.preset}): {key}, {first.seeds} seeds, 95% intervals",
                             xlabel=key)
    print(text, flush=True)
    return {"paths": {"md": str(reports / f"{slug}.md"), "csv": str(reports / f"{slug}.csv"),
                      "json": str(reports / f"{slug}.json"), "png": png}, "points": points, "log": log}


def render_markdown(key: str, labels: list, points: list, first: Study) -> str:
    measures_ = points[0]["summary"]["measures"]
    lines = [f"# Sweep of {key} ({first.name}, {first.table.preset} preset, {first.seeds} seeds)", "",
             f"Mean over seeds [{tables.interval_note(first.seeds)}]. Columns: {', '.join(labels)}.", ""]
    header = [key, "column"] + [tables.row_name(m) for m in measures_] + ["masking flags"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for point in points:
        for label in labels:
            cells = point["summary"]["cells"][label]
            texts = [tables.cell_text(None if cells[m] is None else Estimate.from_dict(cells[m])) for m in measures_]
            lines.append("| " + " | ".join([json.dumps(point["value"]), label, *texts,
                                             point["summary"]["flags"][label]]) + " |")
    if any(point["claims"] for point in points):
        judged = [claim for point in points for claim in point["claims"]]
        lines += ["", f"## {claims_module.heading(judged)} at each value", ""]
        for point in points:
            lines.append(f"- **{key} = {json.dumps(point['value'])}**")
            lines += [f"  - {line}" for line in claims_module.console_lines(point["claims"])]
    return "\n".join(lines) + "\n"


def render_csv(key: str, points: list, seeds: int) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["key", "value", "column", "measure", "mean", "lo", "hi", "n"] + [f"seed {i}" for i in range(seeds)])
    for point in points:
        for label, cells in point["summary"]["cells"].items():
            for measure, cell in cells.items():
                if cell is not None:
                    writer.writerow([key, json.dumps(point["value"]), label, measure, round(cell["mean"], 6),
                                     round(cell["lo"], 6), round(cell["hi"], 6), cell["n"]]
                                    + [round(v, 6) for v in cell["per_seed"]])
    return buffer.getvalue()
