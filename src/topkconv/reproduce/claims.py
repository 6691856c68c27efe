"""The paper's claims as data (``topkconv/experiments/claims.toml``), and a verdict on each from the reproduced tables.

A claim's ``source`` says whose it is: ``paper`` (the default: the paper's two numbers and its sentence) or
``project`` (a question the project asks and the paper does not answer, such as the adversarial-training
table's; no paper numbers, and reports never call it the paper's).

A claim compares two columns of one table on one measure: ``a`` against ``b`` under ``clean``, ``fgsm``
or ``pgd``, in a ``direction`` (``greater``, ``less``, ``equivalent`` within ``margin``, or ``not_less``
than ``b`` by more than ``margin``), with the paper's two numbers and the sentence it comes from. The
difference ``a - b`` is estimated on the same seeds and test examples (:func:`.stats.difference_estimate`).

One measure decides each claim, declared in advance (``decide``, e.g. ``worst@8``); the others the claim
can be read on (the paper's attack at every eps of the spec, the strong suite's worst case at each radius)
are shown as supporting evidence, without verdicts. The deciding measure's verdict (:func:`.stats.verdict`:
reproduced, contradicted, no gain shown, inconclusive) is then Holm-adjusted across the claims of one report
(:func:`adjust`, family-wise 5%), and an inconclusive claim gets the seeds that would settle it.

``reports/claims.md`` and ``claims.json`` hold them all; :func:`console_lines` is what is printed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import from_dict
from ..io import read_toml
from . import measures, stats
from .spec import PRESETS, TABLES, TableSpec, display_path

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
    paper: list = field(default_factory=list)  # the paper's numbers for a and b, as fractions (none: project)
    text: str = ""                     # the paper's sentence, or the project's question
    decide: str = ""                   # the measure that decides the verdict: clean | <metric>@<eps> | worst@<eps>
    delta: Optional[float] = None      # greater / less: the smallest gain that counts (default stats.DELTA)
    source: str = "paper"              # paper | project (the project's own question: no paper numbers)
    # preset -> its own deciding measure, where a preset measures elsewhere (e.g. its AT trains at another
    # radius: {fashion = "worst@8"}); a preset not named here decides on ``decide``
    decide_by_preset: dict = field(default_factory=dict)

    def for_preset(self, preset: str) -> "Claim":
        """This claim as a table of ``preset`` decides it."""
        return dataclasses.replace(self, decide=self.decide_by_preset.get(preset, self.decide))

    @property
    def gain_margin(self) -> float:
        return stats.DELTA if self.delta is None else self.delta

    @property
    def paper_difference(self) -> Optional[float]:
        """The paper's effect A - B; None for the project's own questions."""
        return self.paper[0] - self.paper[1] if self.paper else None

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


SOURCES = ("paper", "project")


def _check(claim: Claim, tables: Optional[dict]) -> None:
    for key in ("id", "table", "a", "b", "metric", "direction", "text", "decide"):
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
    _check_decide(claim)
    if claim.delta is not None and not (isinstance(claim.delta, (int, float)) and 0 < claim.delta < 1):
        raise ValueError(f"'delta' must be a fraction in (0, 1), got {claim.delta!r}")
    _check_paper_numbers(claim)
    table: Optional[TableSpec] = (tables or {}).get(claim.table)
    if table is not None:
        for key in ("a", "b"):
            label = getattr(claim, key)
            if label not in table.labels:
                raise UnknownColumn(f"unknown column {label!r} (key {key!r}) in {claim.table} ({table.path}); "
                                 f"columns are {table.labels}")
            if table.column(label).not_reproduced is not None:
                raise ValueError(f"column {label!r} (key {key!r}) is not reproduced in {table.path}")


def _check_paper_numbers(claim: Claim) -> None:
    """The paper's claims carry its two numbers; the project's own questions carry none."""
    if claim.source not in SOURCES:
        raise ValueError(f"unknown source {claim.source!r}; expected one of {SOURCES}")
    if claim.source == "project":
        if claim.paper:
            raise ValueError(f"a claim with source = 'project' has no paper numbers; remove 'paper' "
                             f"(got {claim.paper!r})")
        return
    if (len(claim.paper) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in claim.paper)):
        raise ValueError(f"missing paper number: 'paper' must hold the paper's two numbers [{claim.a}, {claim.b}] "
                         f"as fractions, got {claim.paper!r} (or set source = 'project' for the project's own "
                         f"question)")
    if any(not 0 <= v <= 1 for v in claim.paper):
        raise ValueError(f"'paper' numbers are fractions in [0, 1], got {claim.paper!r}")


def _check_decide(claim: Claim) -> None:
    """``decide`` (and each of ``decide_by_preset``) names a measure the claim can be read on: ``clean``, or its
    attack or the worst case at an eps."""
    for preset, decide in claim.decide_by_preset.items():
        if preset not in PRESETS:
            raise ValueError(f"'decide_by_preset' names preset {preset!r}; expected one of {PRESETS}")
        _check_decide(dataclasses.replace(claim, decide=decide, decide_by_preset={}))
    family, _, eps = claim.decide.partition("@")
    allowed = ("clean",) if claim.metric == "clean" else (claim.metric, "worst")
    try:
        number = float(eps) if eps else None
    except ValueError:
        number = -1.0
    if family not in allowed or (family == "clean") != (number is None) or (number is not None and number <= 0):
        shapes = "'clean'" if claim.metric == "clean" else f"'{claim.metric}@EPS' or 'worst@EPS' (EPS in 0-255 units)"
        raise ValueError(f"'decide' must be {shapes} for a {claim.metric} claim, got {claim.decide!r}")


def measures_for(claim: Claim, eps_list: list, strong_eps: list) -> list:
    """The measures a claim is judged on: clean; or the paper's attack at every eps, then the worst case."""
    if claim.metric == "clean":
        return ["clean"]
    return [f"{claim.metric}@{e:g}" for e in eps_list] + [f"worst@{e:g}" for e in strong_eps]


def _same_measure(first: str, second: str) -> bool:
    (family, eps), (other, other_eps) = measures.split(first), measures.split(second)
    return family == other and (eps == other_eps or (eps is not None and other_eps is not None
                                                      and abs(eps - other_eps) < 1e-6))


def judge(claim: Claim, results: dict, eps_list: list, strong_eps: list) -> dict:
    """The claim's difference on each of its measures, and the raw verdict from its deciding measure."""
    rows, decision = [], None
    for measure in measures_for(claim, eps_list, strong_eps):
        a = measures.seed_outcomes(results[claim.a], measure)
        b = measures.seed_outcomes(results[claim.b], measure)
        if a is None or b is None:
            continue
        difference = stats.difference_estimate(a, b)
        family, _ = measures.split(measure)
        row = {"measure": measure, "on": "worst case" if family == "worst" else "paper's attack",
               "difference": difference.as_dict()}
        if _same_measure(measure, claim.decide):
            decision = {**row, **_decide(claim, difference)}
        else:
            rows.append(row)
    effect = claim.paper_difference
    paper_holds = None if effect is None else stats.holds(effect, claim.direction, claim.margin)
    return {"id": claim.id, "table": claim.table, "source": claim.source, "statement": claim.statement(),
            "a": claim.a, "b": claim.b, "metric": claim.metric, "direction": claim.direction, "margin": claim.margin,
            "delta": claim.gain_margin if claim.direction in ("greater", "less") else None, "text": claim.text,
            "paper": list(claim.paper), "paper_difference": None if effect is None else round(effect, 6),
            "paper_itself_agrees": paper_holds, "decide": claim.decide, "decision": decision,
            "verdict": decision["verdict"] if decision else stats.NOT_MEASURED,
            "p_value": decision["p_value"] if decision else None, "supporting": rows}


def _decide(claim: Claim, difference: stats.Estimate) -> dict:
    """The raw verdict on the deciding measure, its p-value, and the seeds that would settle the claim."""
    decided = stats.verdict(difference, claim.direction, claim.margin, claim.gain_margin)
    target, target_from = _target_half_width(claim)
    examples_part = stats.example_half_width(difference)
    needed = None
    if difference.method == stats.T_SEEDS and difference.seed_sd > 0:
        needed = stats.seeds_needed(difference.seed_sd, target, difference.level, example_half=examples_part)
    return {"verdict": decided.verdict, "p_value": decided.p_value, "reason": decided.reason,
            "seed_sd": difference.seed_sd, "examples_half_width": examples_part, "target_half_width": target,
            "target_from": target_from, "seeds_needed": needed}


def _target_half_width(claim: Claim) -> tuple:
    """Half the paper's effect (a directional claim), else half of delta (no usable paper effect), else half
    the claim's margin, and which it is."""
    effect = claim.paper_difference
    directional = claim.direction in ("greater", "less")
    if directional and effect is not None and stats.holds(effect, claim.direction) and abs(effect) > 1e-9:
        return abs(effect) / 2, f"half the paper's effect {effect:+.3f}"
    if directional:
        why = "no paper effect: the project's own question" if effect is None else "the paper's own numbers disagree"
        return claim.gain_margin / 2, f"half of delta {claim.gain_margin:g} ({why})"
    return claim.margin / 2, f"half the margin {claim.margin:g}"


def adjust(judged: list, alpha: float = 1 - stats.LEVEL) -> list:
    """Holm-Bonferroni across the measured claims of one report (family-wise ``alpha``): adds ``p_holm`` and
    ``verdict_holm`` (the raw verdict where the adjusted p-value is below ``alpha``, else inconclusive)."""
    measured = [claim for claim in judged if claim["decision"] is not None]
    adjusted = stats.holm([claim["p_value"] for claim in measured]) if measured else []
    for claim, p in zip(measured, adjusted):
        claim["p_holm"] = float(p)
        claim["verdict_holm"] = claim["verdict"] if p < alpha else stats.INCONCLUSIVE
    for claim in judged:
        if claim["decision"] is None:
            claim["p_holm"], claim["verdict_holm"] = None, stats.NOT_MEASURED
    return judged


def _difference_text(row: dict) -> str:
    d = row["difference"]
    return f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def _seeds_text(claim: dict) -> str:
    """The seeds that would settle an inconclusive (after Holm) claim, and at what spread."""
    decision = claim["decision"]
    if decision is None or claim["verdict_holm"] != stats.INCONCLUSIVE:
        return ""
    difference = decision["difference"]
    if difference["method"] != stats.T_SEEDS:
        return f"unknown ({difference['method']})"
    needed, target = decision["seeds_needed"], decision["target_half_width"]
    examples_part = decision.get("examples_half_width", 0.0)
    goal = f"half-width {target:.3f} = {decision['target_from']}"
    if needed is None and examples_part >= target:
        return f"none: the shared test examples alone give +-{examples_part:.3f} ({goal}); more test examples needed"
    count = f">{100_000}" if needed is None else str(needed)
    shared = f", +-{examples_part:.3f} from the shared examples" if examples_part > 0 else ""
    return f"{count} (seed SD {decision['seed_sd']:.3f}{shared}; {goal})"


def _p_text(value) -> str:
    return "–" if value is None else f"{value:.2g}" if value >= 1e-4 else "<1e-4"


def heading(judged: list) -> str:
    """Whose claims a report holds: the paper's, the project's own questions, or both (never mislabelled)."""
    sources = {claim.get("source", "paper") for claim in judged}
    if sources == {"project"}:
        return "The project's own questions"
    return "The paper's claims and the project's own questions" if "project" in sources else "The paper's claims"


PROJECT_MARK = "- (the project's question)"   # the "paper A - B" of a claim the paper does not make


def _paper_text(claim: dict) -> str:
    if claim["paper_difference"] is None:
        return PROJECT_MARK
    agrees = "" if claim["paper_itself_agrees"] else " (paper's own numbers disagree)"
    return f"{claim['paper_difference']:+.3f}{agrees}"


def _sentence(claim: dict) -> str:
    whose = " (the project's own question; the paper makes no such claim)" if claim["paper_difference"] is None else ""
    return f"- **{claim['id']}**{whose}: \"{claim['text']}\""


def render_markdown(judged: list, meta: dict) -> str:
    lines = [f"# {heading(judged)}, tested", ""]
    lines += [f"- **{key}**: {value}" for key, value in meta.items()]
    lines += ["- **verdicts** (on the claim's deciding measure, declared in the claims file): reproduced (for "
              "the project's own questions: shown) = the 95% interval of the paired difference A - B lies on the "
              "claim's side of 0 (inside the margin for "
              "'within'); contradicted = wholly on the other side; no gain shown = a 'greater'/'less' claim whose "
              "interval lies short of the smallest gain that counts (delta, 2 points unless declared); "
              "inconclusive = otherwise",
              "- **p**: the one-sided test behind the verdict, doubled to compare with 5% (decisive when p < 0.05); "
              "**Holm**: the same, adjusted over this report's claims (family-wise 5%); a claim is decided only "
              "if its Holm p is below 0.05",
              "- **seeds needed** (inconclusive claims): the seeds S at which the interval's half-width, "
              "t(0.975, S-1) x seed SD / sqrt(S) (combined with the shared test examples' part, which more seeds "
              "do not narrow), falls to the target given", ""]
    lines.append("| Claim | Decided on | Paper A - B | Ours A - B [95%] | p | Holm p | Verdict | After Holm | "
                 "Seeds needed |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for claim in judged:
        paper = _paper_text(claim)
        decision = claim["decision"]
        ours = _difference_text(decision) if decision else "not measured"
        lines.append(f"| {claim['id']}: {claim['statement']} | {claim['decide']} | {paper} | {ours} | "
                     f"{_p_text(claim['p_value'])} | {_p_text(claim['p_holm'])} | {claim['verdict']} | "
                     f"**{claim['verdict_holm']}** | {_seeds_text(claim)} |")
    lines += ["", "## Supporting measures (no verdicts of their own)", "", "| Claim | Measure | Ours A - B [95%] |",
              "|---|---|---|"]
    for claim in judged:
        lines += [f"| {claim['id']} | {row['measure']} | {_difference_text(row)} |" for row in claim["supporting"]]
    lines += ["", "## Where each claim comes from (the paper's sentence, or the project's question)", ""]
    lines += [_sentence(claim) for claim in judged]
    return "\n".join(lines) + "\n"


def console_lines(judged: list) -> list:
    """One line per claim: the deciding measure, its verdict raw and after Holm, the seeds an open one needs."""
    lines = []
    for claim in judged:
        decision = claim["decision"]
        paper = ("the project's question" if claim["paper_difference"] is None
                 else f"paper {claim['paper_difference']:+.3f}")
        if decision is None:
            lines.append(f"{claim['id']}: {claim['statement']} ({paper}): {claim['decide']} not measured")
            continue
        seeds = _seeds_text(claim)
        lines.append(f"{claim['id']}: {claim['statement']} ({paper}): "
                     f"{claim['decide']} {_difference_text(decision)} p={_p_text(claim['p_value'])} "
                     f"{claim['verdict']}; Holm p={_p_text(claim['p_holm'])} {claim['verdict_holm']}"
                     + (f"; seeds needed {seeds}" if seeds else ""))
    return lines


def count(judged: list, key: str = "verdict_holm") -> dict:
    """How many claims (not measures) got each verdict: Holm-adjusted by default, raw with ``key="verdict"``."""
    out: dict = {}
    for claim in judged:
        out[claim[key]] = out.get(claim[key], 0) + 1
    return dict(sorted(out.items()))


def count_lines(judged: list) -> dict:
    """The counts for a report's header: after Holm, then raw."""
    text = lambda key: ", ".join(f"{k}: {v}" for k, v in count(judged, key).items()) or "none"  # noqa: E731
    lines = {"claims (after Holm)": text("verdict_holm"), "claims (raw)": text("verdict")}
    measured = [claim for claim in judged if claim["verdict_holm"] != stats.NOT_MEASURED]
    if measured and all(claim["verdict_holm"] == stats.INCONCLUSIVE for claim in measured):
        lines["note"] = ("every measured claim is inconclusive with these seeds; 'Seeds needed' says how many "
                         "seeds each would take")
    return lines
