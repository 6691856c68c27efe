"""The paper's tables with our numbers beside the paper's, as Markdown and console text.

The paper's numbers are the published constants in :data:`PAPER` (CINIC-10, VGG16, eps = 8/255),
always shown in columns labelled "paper"; :mod:`topkconv.reproduce.tables` builds a :class:`Table` from the
per-seed evaluations. :func:`masking_flags` and :func:`masking_verdicts` read one column's ``eval.json``
dicts; :func:`render_evaluation` is the Markdown of one ``eval.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

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
NO_PAPER_SETTING = "none: the paper has no such table, so every paper cell is –"  # tableat, the project's own
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
    paper_setting: str = PAPER_SETTING             # what the "paper" columns hold (NO_PAPER_SETTING: nothing)


# ---------------------------------------------------------------- reading eval dicts

def _parts(result: dict) -> tuple:
    """(paper-suite result, [strong-suite results]) of a column result.

    :mod:`topkconv.reproduce` stores ``{"paper": eval dict, "strong": {eps: eval dict}}``; a plain
    ``eval.json`` (``topkconv evaluate``) serves as both.
    """
    if "paper" in result and "strong" in result:
        return result["paper"], list(result["strong"].values())
    return result, [result]


def masking_flags(result: dict) -> list:
    """The masking indicators (the five checks among them) whose verdict is ``flag``, as ``name@eps``."""
    flagged = []
    for part in _parts(result)[1]:
        eps = (part.get("worst_case") or {}).get("eps")
        for name, check in (part.get("indicators") or part.get("masking_checks") or {}).items():
            if isinstance(check, dict) and check.get("verdict") == "flag":
                flagged.append(f"{name}@{eps:g}" if isinstance(eps, (int, float)) else name)
    return sorted(set(flagged))


def strong_parts(result: dict) -> list:
    """The strong-suite evaluations (one per eps) of one seed's result."""
    return list(_parts(result)[1])


def masking_verdicts(result: dict) -> list:
    """The strong suite's verdict at each of its eps: ``[{"eps": E, "verdict": kind, "text": line}]``, where
    ``kind`` is the structured field (``masking shown``, ``masking suspected``, ``attack not converged``,
    ``no masking indicated`` ...; an older eval.json keeps the kind it was judged with),
    with `` (provisional)`` when an attack ran below its reference budget."""
    found = []
    for part in _parts(result)[1]:
        verdict = part.get("verdict") or {}
        if verdict.get("text") and part.get("suite") == "full":
            kind = str(verdict.get("verdict")) + (" (provisional)" if verdict.get("provisional") else "")
            found.append({"eps": (part.get("worst_case") or {}).get("eps"), "verdict": kind,
                          "text": verdict_line(verdict)})
    return found


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
    lines += [f"- **paper columns**: {table.paper_setting}", ""]
    cells = [[_cell(v, table.decimals) for v in row] for row in table.rows]
    lines.append("| " + " | ".join(table.header) + " |")
    lines.append("|" + "|".join("---" for _ in table.header) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    if table.notes:
        lines.append("")
        lines += [f"- {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


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
    lines.append(f"  (paper: {table.paper_setting})")
    return "\n".join(lines)


# ---------------------------------------------------------------- one evaluation (eval.json) as Markdown

def _number(value, decimals: int = 3) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.{decimals}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{decimals}f}"
    return str(value)


def verdict_line(verdict: Optional[dict]) -> str:
    """The verdict's text, labelled **provisional** (with why) when an attack ran below its reference budget."""
    verdict = verdict or {}
    text = verdict.get("text", "no verdict (an older eval.json)")
    if verdict.get("provisional"):
        return f"PROVISIONAL: {text} ({verdict['reason']})"
    return text


def _draw_lines(result: dict) -> list:
    """A random model's headline: the worst case's expected accuracy over draws, and its worst draw."""
    drawn = (result.get("over_draws") or {}).get("worst_case")
    if not drawn:
        return []
    low, high = drawn["interval"]
    return [f"- random model: expected robust accuracy over {drawn['draws']} draws {_number(drawn['expected'])} "
            f"(95% interval [{_number(low)}, {_number(high)}]); worst draw {_number(drawn['worst'])}", ""]


def _budget_lines(result: dict) -> list:
    budgets = result.get("budgets") or {}
    if not budgets:
        return []
    lines = ["## Budgets as a fraction of their reference", "", "| budget | fraction | reference | attacks |",
             "|---|---|---|---|"]
    for table, entry in budgets.items():
        mark = " (below)" if entry["below_reference"] else ""
        lines.append(f"| {table} | {_number(entry['fraction'])}{mark} | {entry['reference']} | "
                     f"{', '.join(entry['attacks'])} |")
    return lines + [""]


def render_evaluation(result: dict, title: str = "") -> str:
    """Markdown of one ``eval.json``: the verdict line first, then the worst case per eps, each attack and
    each indicator with its value, threshold and verdict."""
    verdict = verdict_line(result.get("verdict"))
    lines = [f"# {title or 'Robustness evaluation'}", "", f"**Verdict: {verdict}**", "",
             f"- suite: {result['suite']}; n = {result.get('n_examples', result.get('n'))}; clean accuracy {_number(result['clean'])}",
             f"- model: " + ", ".join(f"{k} {v}" for k, v in (result.get("model") or {}).items()), ""]
    lines += _draw_lines(result)
    lines += _budget_lines(result)
    lines += ["## Worst case per eps (an example counts only if it survives every attack at that eps)", "",
              "| eps | accuracy | attacks |", "|---|---|---|"]
    for worst in result.get("worst_cases") or [result["worst_case"]]:
        lines.append(f"| {worst['eps']:g} | {_number(worst['accuracy'])} | {', '.join(worst['attacks'])} |")
    lines += ["", "## Attacks", "", "| attack | eps | accuracy | seconds |", "|---|---|---|---|"]
    for name, entry in result["attacks"].items():
        lines.append(f"| {name} | {entry['params'].get('eps', MISSING)} | {_number(entry['accuracy'])} | "
                     f"{entry['seconds']:.1f} |")
    from .attacks.indicators import RENAMED

    indicators = result.get("indicators") or result.get("masking_checks") or {}
    indicators = {RENAMED.get(name, name): entry for name, entry in indicators.items()}   # earlier eval.json
    examples = result.get("indicator_examples")
    lines += ["", "## Masking indicators" + (f" (model-run ones on the first {examples} examples)" if examples else ""),
              "", "| indicator | value | threshold | verdict |", "|---|---|---|---|"]
    for name, entry in indicators.items():
        note = f" ({entry['reason']})" if entry.get("reason") else ""
        lines.append(f"| {name} | {_number(entry.get('value'))} | {_number(entry.get('threshold'))} | "
                     f"{entry.get('verdict')}{note} |")
    return "\n".join(lines) + "\n"
