"""The paper's tables with our numbers beside the paper's: Markdown, CSV and console text.

The paper's numbers are the published constants in :data:`PAPER` (CINIC-10, VGG16, eps = 8/255),
always shown in columns labelled "paper". Ours come from the ``eval.json`` dicts that
:func:`topkconv.evaluate.evaluate` returns: the clean accuracy, the paper's FGSM and PGD, the same at
any larger eps of the spec, the strong-suite worst case, the masking indicators' flags and one masking
verdict per model in the report's first lines. :func:`render_evaluation` is the Markdown of one ``eval.json``.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .io import atomic_write_text

# The paper's published numbers. Tables I and III: accuracy as a fraction; Table II: percent.
PAPER: dict[str, dict[tuple[str, str], Optional[float]]] = {
    "table1": {
        ("None", "Baseline"): 0.895, ("None", "SAP"): 0.896, ("None", "Dropout"): 0.858,
        ("None", "Pruning"): 0.884, ("None", "Pruning + LogitAug"): 0.884, ("None", "Dynamic-k"): 0.921,
        ("FGSM", "Baseline"): 0.192, ("FGSM", "SAP"): 0.207, ("FGSM", "Dropout"): 0.233,
        ("FGSM", "Pruning"): 0.340, ("FGSM", "Pruning + LogitAug"): 0.369, ("FGSM", "Dynamic-k"): 0.388,
        ("PGD", "Baseline"): 0.084, ("PGD", "SAP"): None, ("PGD", "Dropout"): 0.108,
        ("PGD", "Pruning"): 0.223, ("PGD", "Pruning + LogitAug"): 0.245, ("PGD", "Dynamic-k"): 0.324,
    },
    "table2": {
        ("Pruning", "Final layer only"): 15.2, ("Pruning", "Final two layers"): 16.1,
        ("Pruning", "All layers"): 19.8,
        ("Dynamic-K", "Final layer only"): 27.8, ("Dynamic-K", "Final two layers"): 31.1,
    },
    "table3": {
        ("None", "Baseline"): 0.895, ("None", "Dynamic-k"): 0.921, ("None", "TKC-neuron"): 0.912,
        ("None", "TKC-max"): 0.903, ("None", "TKC-sum"): 0.895,
        ("FGSM", "Baseline"): 0.192, ("FGSM", "Dynamic-k"): 0.388, ("FGSM", "TKC-neuron"): 0.398,
        ("FGSM", "TKC-max"): 0.401, ("FGSM", "TKC-sum"): 0.398,
        ("PGD", "Baseline"): 0.084, ("PGD", "Dynamic-k"): 0.324, ("PGD", "TKC-neuron"): 0.385,
        ("PGD", "TKC-max"): 0.421, ("PGD", "TKC-sum"): 0.296,
    },
}
PAPER_SETTING = "CINIC-10, VGG16 at 224 px (pretrained init), L-inf eps = 8/255, PGD 16 x 0.75/255"
PAPER_EPS = 8.0
TABLE2_SEPARATOR = " / "  # Table II entries are labelled "<Method> / <Layers affected>"

MISSING = "–"


@dataclass
class Table:
    """A rendered-agnostic table: a header and rows of cells (str, float or None)."""
    name: str
    title: str
    header: list
    rows: list
    notes: list = field(default_factory=list)
    decimals: int = 3
    headline: list = field(default_factory=list)   # lines shown first: one masking verdict per model


# ---------------------------------------------------------------- reading eval dicts

def _parts(result: dict) -> tuple:
    """(paper-suite result, [strong-suite results]) of a column result.

    :mod:`topkconv.reproduce` stores ``{"paper": eval dict, "strong": {eps: eval dict}}``; a plain
    ``eval.json`` (``topkconv evaluate``) serves as both.
    """
    if "paper" in result and "strong" in result:
        return result["paper"], list(result["strong"].values())
    return result, [result]


def clean_accuracy(result: dict) -> Optional[float]:
    return _parts(result)[0].get("clean")


def attack_accuracy(result: dict, attack: str, eps: float) -> Optional[float]:
    """Accuracy under the paper's ``attack`` ("fgsm" or "pgd") at ``eps`` (0-255 units), or None."""
    paper, _ = _parts(result)
    for name, entry in (paper.get("attacks") or {}).items():
        if name.split("@")[0] != attack:
            continue
        if math.isclose(float(entry.get("params", {}).get("eps", float("nan"))), eps, abs_tol=1e-6):
            return float(entry["accuracy"])
    return None


def worst_case(result: dict, eps: float) -> Optional[float]:
    """The strong suite's per-example worst case at ``eps``: robust only if every attack fails."""
    for part in _parts(result)[1]:
        worst = part.get("worst_case") or {}
        if part.get("suite") == "full" and math.isclose(float(worst.get("eps", float("nan"))), eps, abs_tol=1e-6):
            return float(worst["accuracy"])
    return None


def masking_flags(result: dict) -> list:
    """The masking indicators (the five checks among them) whose verdict is ``flag``, as ``name@eps``."""
    flagged = []
    for part in _parts(result)[1]:
        eps = (part.get("worst_case") or {}).get("eps")
        for name, check in (part.get("indicators") or part.get("masking_checks") or {}).items():
            if isinstance(check, dict) and check.get("verdict") == "flag":
                flagged.append(f"{name}@{eps:g}" if isinstance(eps, (int, float)) else name)
    return sorted(set(flagged))


def masking_verdicts(result: dict) -> list:
    """The strong suite's one-line verdict at each of its eps, as ``"eps=E: text"``."""
    lines = []
    for part in _parts(result)[1]:
        text = (part.get("verdict") or {}).get("text")
        eps = (part.get("worst_case") or {}).get("eps")
        if text and part.get("suite") == "full":
            lines.append(f"eps={eps:g}: {text}" if isinstance(eps, (int, float)) else text)
    return lines


def verdict_headline(labels: list, results: dict) -> list:
    """One line per model: its masking verdicts (the first lines of a table's report)."""
    lines = []
    for label in labels:
        result = results.get(label)
        verdicts = masking_verdicts(result) if result is not None else []
        if verdicts:
            lines.append(f"{label}: " + "; ".join(verdicts))
    return lines


# ---------------------------------------------------------------- building tables

def attack_table(name: str, title: str, labels: list, results: dict, eps_list: list,
                 not_reproduced: Optional[dict] = None, notes: Optional[list] = None,
                 strong_eps: Optional[list] = None) -> Table:
    """Tables I and III: rows are attacks, each column has "<label> ours" and "<label> paper".

    ``results`` maps a label to its column result (None while missing). ``eps_list`` holds the radii
    of the paper's attacks in 0-255 units, the paper's first; ``strong_eps`` those of the strong suite.
    """
    not_reproduced = not_reproduced or {}
    paper = PAPER.get(name, {})
    header = ["Attack"]
    for label in labels:
        header += [f"{label} ours", f"{label} paper"]
    rows = []

    def row(row_name, paper_row, ours):
        cells = [row_name]
        for label in labels:
            result = results.get(label)
            if label in not_reproduced:
                cells.append("not reproduced")
            else:
                cells.append(ours(result) if result is not None else None)
            cells.append(paper.get((paper_row, label)) if paper_row else None)
        rows.append(cells)

    row("None", "None", clean_accuracy)
    for i, eps in enumerate(eps_list):
        suffix = "" if i == 0 and math.isclose(eps, PAPER_EPS) else f" (eps={eps:g})"
        paper_row = i == 0 and math.isclose(eps, PAPER_EPS)
        row(f"FGSM{suffix}", "FGSM" if paper_row else None, lambda r, e=eps: attack_accuracy(r, "fgsm", e))
        row(f"PGD{suffix}", "PGD" if paper_row else None, lambda r, e=eps: attack_accuracy(r, "pgd", e))
    for eps in (eps_list if strong_eps is None else strong_eps):
        row(f"Strong-suite worst case (eps={eps:g})", None, lambda r, e=eps: worst_case(r, e))
    row("Gradient-masking flags", None, lambda r: ", ".join(masking_flags(r)) or "none")
    notes = list(notes or [])
    for label, reason in not_reproduced.items():
        notes.append(f"{label}: not reproduced: {reason}.")
    return Table(name, title, header, rows, notes, headline=verdict_headline(labels, results))


def pruning_table(title: str, labels: list, results: dict, eps: float,
                  notes: Optional[list] = None, eps_list: Optional[list] = None,
                  strong_eps: Optional[list] = None) -> Table:
    """Table II: adversarial accuracy (percent) under PGD, per method and layers affected.

    The paper's column is PGD at ``eps``; any larger radius of ``eps_list`` and the strong-suite worst
    case at each of ``strong_eps`` get columns of their own (ours only).
    """
    paper = PAPER["table2"]
    extra = [e for e in (eps_list or [eps]) if not math.isclose(e, eps)]
    strong = list(strong_eps if strong_eps is not None else [eps])
    header = (["Method", "Layers Affected", "Adv Acc ours", "Adv Acc paper"]
              + [f"Adv Acc ours (eps={e:g})" for e in extra] + ["Clean ours"]
              + [f"Worst case ours (eps={e:g})" for e in strong] + ["Gradient-masking flags"])
    percent = lambda v: None if v is None else 100.0 * v  # noqa: E731 - Table II is in percent
    rows = []
    for label in labels:
        method, _, layers = label.partition(TABLE2_SEPARATOR)
        result = results.get(label)
        if result is None:
            rows.append([method, layers, None, paper.get((method, layers))] + [None] * (len(header) - 4))
            continue
        rows.append([method, layers, percent(attack_accuracy(result, "pgd", eps)), paper.get((method, layers))]
                    + [percent(attack_accuracy(result, "pgd", e)) for e in extra]
                    + [percent(clean_accuracy(result))]
                    + [percent(worst_case(result, e)) for e in strong]
                    + [", ".join(masking_flags(result)) or "none"])
    return Table("table2", title, header, rows, list(notes or []), decimals=1,
                 headline=verdict_headline(labels, results))


# ---------------------------------------------------------------- rendering

def _cell(value: Any, decimals: int) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.{decimals}f}"
    return str(value)


def render_markdown(table: Table, meta: dict) -> str:
    lines = [f"# {table.title}", ""]
    if table.headline:
        lines += ["**Masking verdicts** (strong suite):", ""] + [f"- {line}" for line in table.headline] + [""]
    for key, value in meta.items():
        lines.append(f"- **{key}**: {value}")
    lines += [f"- **paper columns**: {PAPER_SETTING}", ""]
    cells = [[_cell(v, table.decimals) for v in row] for row in table.rows]
    lines.append("| " + " | ".join(table.header) + " |")
    lines.append("|" + "|".join("---" for _ in table.header) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    if table.notes:
        lines.append("")
        lines += [f"- {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


def render_csv(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.header)
    for row in table.rows:
        writer.writerow(["" if v is None else (round(v, 6) if isinstance(v, float) else v) for v in row])
    return buffer.getvalue()


def _paired(table: Table) -> tuple:
    """Header and text rows with each "<X> ours" / "<X> paper" pair merged into one "ours / paper" cell,
    so a five-column table fits a terminal."""
    header, index, i = [], [], 0
    while i < len(table.header):
        name = table.header[i]
        if (name.endswith(" ours") and i + 1 < len(table.header)
                and table.header[i + 1] == name[:-len(" ours")] + " paper"):
            header.append(name[:-len(" ours")] + " (ours / paper)")
            index.append((i, i + 1))
            i += 2
        else:
            header.append(name)
            index.append((i,))
            i += 1
    def merged(row, group):
        if len(group) == 2 and row[group[1]] is None and isinstance(row[group[0]], str):
            return row[group[0]]  # a text cell (flags, "not reproduced") has no paper counterpart
        return " / ".join(_cell(row[j], table.decimals) for j in group)

    rows = [[merged(row, group) for group in index] for row in table.rows]
    return header, rows


def render_console(table: Table) -> str:
    header, rows = _paired(table)
    cells = [header] + rows
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths)))
    lines = [table.title] + [f"  masking: {line}" for line in table.headline]
    lines += [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(row) for row in cells[1:]]
    lines += [f"  {note}" for note in table.notes]
    lines.append(f"  (paper: {PAPER_SETTING})")
    return "\n".join(lines)


def write_table(reports_dir, table: Table, meta: dict) -> dict:
    """Write ``<reports_dir>/<name>.md`` and ``.csv``; returns their paths."""
    reports_dir = Path(reports_dir)
    md = reports_dir / f"{table.name}.md"
    csv_path = reports_dir / f"{table.name}.csv"
    atomic_write_text(md, render_markdown(table, meta))
    atomic_write_text(csv_path, render_csv(table))
    return {"md": str(md), "csv": str(csv_path)}


# ---------------------------------------------------------------- one evaluation (eval.json) as Markdown

def _number(value, decimals: int = 3) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.{decimals}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{decimals}f}"
    return str(value)


def render_evaluation(result: dict, title: str = "") -> str:
    """Markdown of one ``eval.json``: the verdict line first, then the worst case per eps, each attack and
    each indicator with its value, threshold and verdict."""
    verdict = (result.get("verdict") or {}).get("text", "no verdict (an older eval.json)")
    lines = [f"# {title or 'Robustness evaluation'}", "", f"**Verdict: {verdict}**", "",
             f"- suite: {result['suite']}; n = {result.get('n_examples', result.get('n'))}; clean accuracy {_number(result['clean'])}",
             f"- model: " + ", ".join(f"{k} {v}" for k, v in (result.get("model") or {}).items()), ""]
    lines += ["## Worst case per eps (an example counts only if it survives every attack at that eps)", "",
              "| eps | accuracy | attacks |", "|---|---|---|"]
    for worst in result.get("worst_cases") or [result["worst_case"]]:
        lines.append(f"| {worst['eps']:g} | {_number(worst['accuracy'])} | {', '.join(worst['attacks'])} |")
    lines += ["", "## Attacks", "", "| attack | eps | accuracy | seconds |", "|---|---|---|---|"]
    for name, entry in result["attacks"].items():
        lines.append(f"| {name} | {entry['params'].get('eps', MISSING)} | {_number(entry['accuracy'])} | "
                     f"{entry['seconds']:.1f} |")
    indicators = result.get("indicators") or result.get("masking_checks") or {}
    examples = result.get("indicator_examples")
    lines += ["", "## Masking indicators" + (f" (model-run ones on the first {examples} examples)" if examples else ""),
              "", "| indicator | value | threshold | verdict |", "|---|---|---|---|"]
    for name, entry in indicators.items():
        note = f" ({entry['reason']})" if entry.get("reason") else ""
        lines.append(f"| {name} | {_number(entry.get('value'))} | {_number(entry.get('threshold'))} | "
                     f"{entry.get('verdict')}{note} |")
    return "\n".join(lines) + "\n"
