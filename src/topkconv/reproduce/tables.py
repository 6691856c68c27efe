"""The table drivers: from a finished :class:`~.spec.Study` to ``reports/<table>.md``, ``.csv``, ``.json``
and ``.png``.

Every cell is the mean over seeds with its 95% interval (:mod:`.stats`: t over the seeds, or the exact
Clopper-Pearson bound of the pooled examples where every seed is at 0 or 1, marked ``*``), written
``0.306 [0.22, 0.39]`` in Markdown with the paper's number in the column beside it. The CSV has one line
per cell (mean, interval, paper, and each seed's value); the JSON holds the same plus the runs. Nothing
in these files depends on timing or on ``--jobs``, so two runs of the same command write the same bytes.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from . import measures, stats
from .spec import Study, display_path

ROW_NAMES = {"clean": "None", "fgsm": "FGSM", "pgd": "PGD", "worst": "Strong-suite worst case"}


def row_name(measure: str) -> str:
    from ..report import PAPER_EPS

    family, eps = measures.split(measure)
    name = ROW_NAMES[family]
    if eps is None or (family != "worst" and math.isclose(eps, PAPER_EPS)):
        return name
    return f"{name} (eps={eps:g})"


def paper_value(table: str, label: str, measure: str):
    """The paper's number for a cell (as a fraction), or None: the paper reports eps = 8/255 only."""
    from ..report import PAPER, PAPER_EPS, TABLE2_SEPARATOR

    family, eps = measures.split(measure)
    if family == "worst" or (eps is not None and not math.isclose(eps, PAPER_EPS)):
        return None
    if table == "table2":
        method, _, layers = label.partition(TABLE2_SEPARATOR)
        value = PAPER["table2"].get((method, layers)) if family == "pgd" else None
        return None if value is None else value / 100.0   # Table II is printed in percent
    return PAPER.get(table, {}).get((ROW_NAMES[family], label))


EXACT_MARK = "*"   # a cell whose interval is the exact one of the pooled examples (every seed at 0 or at 1)


def cell_text(estimate) -> str:
    if estimate is None:
        return "–"
    mark = EXACT_MARK if estimate.method == stats.EXACT else ""
    return f"{estimate.mean:.3f} [{estimate.low:.2f}, {estimate.high:.2f}]{mark}"


def interval_note(seeds: int) -> str:
    """How the cells' intervals were made, for a table's notes and header."""
    if seeds == 1:
        return ("95% interval of the test examples only (Clopper-Pearson): with 1 seed the seed-to-seed "
                "variation is not measured")
    return (f"95% interval: Student's t over the {seeds} seed accuracies (df {seeds - 1}), widened by the share "
            f"of the test examples every seed shares; {EXACT_MARK} = every seed at 0 or at 1: exact "
            f"(Clopper-Pearson) bound of the {seeds} x n pooled examples")


def summarise(study: Study, results: dict) -> dict:
    """``{"measures": [...], "cells": {label: {measure: Estimate dict or None}}, "flags": {label: text}}``."""
    names = measures.names(study.eps_list(), study.strong_radii())
    cells, flags, verdicts, binarization = {}, {}, {}, {}
    for label, seeds in results.items():
        cells[label] = {}
        for measure in names:
            estimate = measures.estimate(seeds, measure)
            cells[label][measure] = None if estimate is None else estimate.as_dict()
        flags[label] = measures.masking_flags(seeds)
        verdicts[label] = measures.masking_verdicts(seeds)
        binarization[label] = measures.binarization_summary(seeds)
    return {"measures": names, "cells": cells, "flags": flags, "verdicts": verdicts, "binarization": binarization}


def build_table(study: Study, summary: dict):
    """A :class:`topkconv.report.Table`: one row per measure, "<label> ours" / "<label> paper" columns."""
    from ..report import NO_PAPER_SETTING, PAPER, PAPER_SETTING, Table

    table = study.table
    not_reproduced = {c.label: c.not_reproduced for c in table.columns if c.not_reproduced is not None}
    header = ["Attack"]
    for label in table.labels:
        header += [f"{label} ours", f"{label} paper"]
    rows = []
    for measure in summary["measures"]:
        row = [row_name(measure)]
        for label in table.labels:
            if label in not_reproduced:
                row.append("not reproduced")
            else:
                cell = summary["cells"][label][measure]
                row.append(cell_text(None if cell is None else stats.Estimate.from_dict(cell)))
            row.append(paper_value(table.table, label, measure))
        rows.append(row)
    # The masking verdicts and flags are too long for a table cell: one line per model, above the table.
    headline = [f"{label}: {summary['verdicts'].get(label) or 'no strong suite'}; flagged: {summary['flags'][label]}"
                + _binarization_text(summary, label) for label in table.labels if label not in not_reproduced]
    notes = [table.note] if table.note else []
    notes.append(f"ours: mean over {study.seeds} training seeds [{interval_note(study.seeds)}]; per-seed values "
                 f"in {table.table}.csv/.json.")
    notes += [f"{label}: not reproduced: {reason}." for label, reason in not_reproduced.items()]
    return Table(table.table, table.title or table.table, header, rows, notes, headline=headline,
                 paper_setting=PAPER_SETTING if table.table in PAPER else NO_PAPER_SETTING)


def _binarization_text(summary: dict, label: str) -> str:
    found = summary.get("binarization", {}).get(label)
    return f"; binarization test: {found}" if found else ""


def render_csv(study: Study, summary: dict) -> str:
    """One line per cell: where it is, its mean and interval, the paper's number, and each seed's value."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["table", "row", "measure", "column", "mean", "lo", "hi", "paper", "n"]
                    + [f"seed {i}" for i in range(study.seeds)] + ["interval"])
    for measure in summary["measures"]:
        for label, cells in summary["cells"].items():
            cell = cells[measure]
            if cell is None:
                continue
            paper = paper_value(study.name, label, measure)
            writer.writerow([study.name, row_name(measure), measure, label, _round(cell["mean"]),
                             _round(cell["lo"]), _round(cell["hi"]), "" if paper is None else paper, cell["n"]]
                            + [_round(v) for v in cell["per_seed"]] + [cell.get("method", "")])
    return buffer.getvalue()


def _round(value: float) -> float:
    return round(float(value), 6)


def meta(study: Study) -> dict:
    """What the Markdown says about how the numbers were made (nothing here varies between reruns)."""
    from ..io import environment_info

    spec = study.first_spec
    attack = spec.attack
    env = environment_info()
    # only digits ships inside a wheel; the other data sets are read from their default location
    where = display_path(spec.data.root) if spec.data.root else ("embedded" if spec.data.name == "digits"
                                                                  else "its default location")
    data = f"{spec.data.name} ({where})"
    limit = study.table.eval_examples
    strong = f"first {attack.n_examples}" if attack.n_examples else "all"
    seeds = ", ".join(str(spec.train.seed + i) for i in range(study.seeds))
    return {
        "preset": f"{study.table.preset} (spec {display_path(study.table.path)})",
        "data": f"{data}, {spec.data.image_size} px, split seed {spec.data.split_seed} (the same for every seed)",
        "model": f"{spec.model.arch}, width {spec.model.width}, hidden {spec.model.hidden}, {spec.train.epochs} epochs, "
                 + (f"features initialised from {spec.model.pretrained}" if spec.model.pretrained
                    else "random init (the paper started from ImageNet weights)" if spec.model.arch == "vgg16"
                    else "random init"),
        "attacks": f"L-inf eps {', '.join(f'{e:g}' for e in study.eps_list())} /255; FGSM and PGD "
                   f"{attack.budget('pgd').steps} x {attack.budget('pgd').step_size:g}/255 (the step scaled with eps) on "
                   f"{f'the first {limit}' if limit else 'all'} test images; strong suite ({attack.suite}) at "
                   f"{', '.join(f'{e:g}' for e in study.strong_radii()) or 'none'} on the {strong} test images",
        "seeds": f"{study.seeds} training seeds (train.seed {seeds}: initialisation, batch order, augmentation); "
                 f"attack seed {attack.seed}",
        "intervals": interval_note(study.seeds),
        "hardware": f"{env['device']}, {env['cpu_count']} CPU cores; torch {env['torch']}; {env['platform']}",
        "commit": env.get("git_commit") or "unknown",
    }


def write_reports(workspace, study: Study, results: dict) -> dict:
    """``reports/<table>.md``, ``.csv``, ``.json`` and the bar chart ``.png``; prints the table."""
    from .. import figures, report
    from ..io import atomic_write_json, atomic_write_text

    summary = summarise(study, results)
    table = build_table(study, summary)
    info = meta(study)
    reports = Path(workspace.reports)
    md = reports / f"{study.name}.md"
    csv_path = reports / f"{study.name}.csv"
    json_path = reports / f"{study.name}.json"
    png = reports / f"{study.name}.png"
    atomic_write_text(md, report.render_markdown(table, info))
    atomic_write_text(csv_path, render_csv(study, summary))
    atomic_write_json(json_path, {"meta": info, "seeds": study.seeds, **summary,
                                  "runs": {label: [seed["run"] for seed in seeds] for label, seeds in results.items()},
                                  "paper": {label: {m: paper_value(study.name, label, m) for m in summary["measures"]}
                                            for label in results}})
    figures.interval_bars(summary, {label: {m: paper_value(study.name, label, m) for m in summary["measures"]}
                                    for label in results},
                          png, title=f"{table.title} ({study.seeds} seeds, 95% intervals)",
                          row_names={m: row_name(m) for m in summary["measures"]})
    print(report.render_console(table), flush=True)
    return {"md": str(md), "csv": str(csv_path), "json": str(json_path), "png": str(png), "summary": summary}
