"""The paper's claims as data (``topkconv/experiments/claims.toml``), and a verdict on each from the reproduced tables.

A claim compares two columns of one table on one measure: ``a`` against ``b`` under ``clean``, ``fgsm``
or ``pgd``, in a ``direction`` (``greater``, ``less``, ``equivalent`` within ``margin``, or ``not_less``
than ``b`` by more than ``margin``), with the paper's two numbers and the sentence it comes from. The
difference ``a - b`` is estimated on the same seeds and test examples (:func:`.stats.paired_difference`),
and the verdict (:func:`.stats.verdict`) is given

* on the paper's attack at the paper's eps (8/255), and at any larger eps the table's spec adds, and
* again on the strong suite's per-example worst case at each radius where it ran (an attack claim only).

``reports/claims.md`` and ``claims.json`` hold them all; :func:`console_lines` is what is printed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import from_dict
from ..io import read_toml
from . import measures, stats
from .spec import TABLES, TableSpec

METRICS = ("clean", "fgsm", "pgd")


@dataclass
class Claim:
    id: str = ""
    table: str = ""
    a: str = ""                        # the column the paper says wins (or holds its ground)
    b: str = ""                        # the column it is compared with
    metric: str = ""                   # clean | fgsm | pgd
    direction: str = ""                # greater | less | equivalent | not_less
    margin: Optional[float] = None     # equivalent / not_less: the margin, as a fraction (0.02 = 2 points)
    paper: list = field(default_factory=list)  # the paper's numbers for a and b, as fractions
    text: str = ""                     # the paper's sentence

    @property
    def paper_difference(self) -> float:
        return self.paper[0] - self.paper[1]

    def statement(self) -> str:
        what = {"clean": "clean accuracy", "fgsm": "accuracy under FGSM", "pgd": "accuracy under PGD"}[self.metric]
        relation = {"greater": ">", "less": "<", "equivalent": f"within +-{(self.margin or 0) * 100:g} points of",
                    "not_less": f"at least (-{(self.margin or 0) * 100:g} points)"}[self.direction]
        return f"{self.a} {relation} {self.b}: {what}"


def default_path() -> Path:
    from .spec import experiments_dir

    return experiments_dir() / "claims.toml"


class UnknownColumn(ValueError):
    """A claim names a column its table's spec does not have."""


def load_claims(path=None, tables: Optional[dict] = None, skip_missing_columns: bool = False) -> list:
    """Read and check the claims file. ``tables`` (name -> :class:`TableSpec`) checks the columns too.

    Every error names the file and the entry (``claims[3] (id 'T3-tkc-max-pgd')``) and what is wrong:
    an unknown key, table, column, metric or direction, a missing margin, or a missing paper number.
    With ``skip_missing_columns`` (the built-in claims against a user's own, smaller table spec), a claim
    whose columns the spec lacks is left out instead.
    """
    path = Path(path) if path is not None else default_path()
    raw = read_toml(path, "claims file")
    unknown = set(raw) - {"claims"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; expected [[claims]] entries")
    entries = raw.get("claims")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: no [[claims]] entries")
    claims, ids = [], set()
    for i, entry in enumerate(entries):
        name = f"claims[{i}]" + (f" (id {entry.get('id')!r})" if isinstance(entry, dict) and entry.get("id") else "")
        try:
            claim = from_dict(Claim, entry, f"claims[{i}]")
            _check(claim, tables)
        except UnknownColumn as err:
            if skip_missing_columns:
                continue
            raise ValueError(f"{path}: {name}: {err}") from None
        except ValueError as err:
            raise ValueError(f"{path}: {name}: {err}") from None
        if claim.id in ids:
            raise ValueError(f"{path}: {name}: id {claim.id!r} repeats")
        ids.add(claim.id)
        claims.append(claim)
    return claims


def _check(claim: Claim, tables: Optional[dict]) -> None:
    for key in ("id", "table", "a", "b", "metric", "direction", "text"):
        if not getattr(claim, key):
            raise ValueError(f"key {key!r} is missing or empty")
    if claim.table not in TABLES:
        raise ValueError(f"unknown table {claim.table!r}; expected one of {TABLES}")
    if claim.metric not in METRICS:
        raise ValueError(f"unknown metric {claim.metric!r}; expected one of {METRICS}")
    if claim.direction not in stats.DIRECTIONS:
        raise ValueError(f"unknown direction {claim.direction!r}; expected one of {stats.DIRECTIONS}")
    if claim.direction in ("equivalent", "not_less") and not (isinstance(claim.margin, (int, float))
                                                              and 0 < claim.margin < 1):
        raise ValueError(f"direction {claim.direction!r} needs 'margin', a fraction in (0, 1), got {claim.margin!r}")
    if (len(claim.paper) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in claim.paper)):
        raise ValueError(f"missing paper number: 'paper' must hold the paper's two numbers [{claim.a}, {claim.b}] "
                         f"as fractions, got {claim.paper!r}")
    if any(not 0 <= v <= 1 for v in claim.paper):
        raise ValueError(f"'paper' numbers are fractions in [0, 1], got {claim.paper!r}")
    table: Optional[TableSpec] = (tables or {}).get(claim.table)
    if table is not None:
        for key in ("a", "b"):
            label = getattr(claim, key)
            if label not in table.labels:
                raise UnknownColumn(f"unknown column {label!r} (key {key!r}) in {claim.table} ({table.path}); "
                                 f"columns are {table.labels}")
            if table.column(label).not_reproduced is not None:
                raise ValueError(f"column {label!r} (key {key!r}) is not reproduced in {table.path}")


def measures_for(claim: Claim, eps_list: list, strong_eps: list) -> list:
    """The measures a claim is judged on: clean; or the paper's attack at every eps, then the worst case."""
    if claim.metric == "clean":
        return ["clean"]
    return [f"{claim.metric}@{e:g}" for e in eps_list] + [f"worst@{e:g}" for e in strong_eps]


def judge(claim: Claim, results: dict, eps_list: list, strong_eps: list) -> dict:
    """The claim's difference and verdict on each of its measures, from one table's per-seed results."""
    rows = []
    for measure in measures_for(claim, eps_list, strong_eps):
        a = measures.seed_outcomes(results[claim.a], measure)
        b = measures.seed_outcomes(results[claim.b], measure)
        if a is None or b is None:
            continue
        difference = stats.paired_difference(a, b)
        decided = stats.verdict(difference, claim.direction, claim.margin)
        family, _ = measures.split(measure)
        rows.append({"measure": measure, "on": "worst case" if family == "worst" else "paper's attack",
                     "difference": difference.as_dict(), "verdict": decided.verdict, "reason": decided.reason})
    paper_holds = stats.holds(claim.paper_difference, claim.direction, claim.margin)
    return {"id": claim.id, "table": claim.table, "statement": claim.statement(), "a": claim.a, "b": claim.b,
            "metric": claim.metric, "direction": claim.direction, "margin": claim.margin, "text": claim.text,
            "paper": list(claim.paper), "paper_difference": round(claim.paper_difference, 6),
            "paper_itself_agrees": paper_holds, "verdicts": rows}


def _difference_text(row: dict) -> str:
    d = row["difference"]
    return f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def render_markdown(judged: list, meta: dict) -> str:
    lines = ["# The paper's claims, tested", ""]
    lines += [f"- **{key}**: {value}" for key, value in meta.items()]
    lines += ["- **verdicts**: reproduced = the 95% interval of the paired difference A - B lies on the paper's "
              "side (inside the margin for 'within'); contradicted = wholly on the other side; inconclusive = "
              "otherwise", ""]
    lines.append("| Claim | Measure | Paper A - B | Ours A - B [95%] | Verdict |")
    lines.append("|---|---|---|---|---|")
    for claim in judged:
        paper = f"{claim['paper_difference']:+.3f}" + ("" if claim["paper_itself_agrees"] else " (paper's own "
                                                                                           "numbers disagree)")
        for i, row in enumerate(claim["verdicts"]):
            first = i == 0
            lines.append(f"| {claim['id'] + ': ' + claim['statement'] if first else ''} | {row['measure']} | "
                         f"{paper if first else ''} | {_difference_text(row)} | **{row['verdict']}** |")
        if not claim["verdicts"]:
            lines.append(f"| {claim['id']}: {claim['statement']} | – | {paper} | not measured | – |")
    lines += ["", "## The paper's sentences", ""]
    lines += [f"- **{claim['id']}**: \"{claim['text']}\"" for claim in judged]
    return "\n".join(lines) + "\n"


def console_lines(judged: list) -> list:
    """One line per claim: the statement, then the verdict on each measure."""
    lines = []
    for claim in judged:
        parts = [f"{row['measure']} {_difference_text(row)} {row['verdict']}" for row in claim["verdicts"]]
        lines.append(f"{claim['id']}: {claim['statement']} (paper {claim['paper_difference']:+.3f}): "
                     + ("; ".join(parts) or "not measured"))
    return lines


def count(judged: list) -> dict:
    """How many verdicts of each kind, on the paper's attacks and on the worst case."""
    out: dict = {}
    for claim in judged:
        for row in claim["verdicts"]:
            key = f"{row['on']}: {row['verdict']}"
            out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))
