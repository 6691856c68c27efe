"""The paper's claims as data: the real claims file, malformed entries, and verdicts from per-seed outcomes."""

from pathlib import Path

import numpy as np
import pytest

from topkconv.reproduce import claims as C
from topkconv.reproduce import load_table_spec

EXPERIMENTS = Path(__file__).resolve().parents[1] / "src" / "topkconv" / "experiments"


@pytest.mark.parametrize("preset", ["quick", "paper"])
def test_the_claims_file_names_real_columns_of_every_table(preset):
    tables = {t: load_table_spec(EXPERIMENTS / f"{t}-{preset}.toml") for t in ("table1", "table2", "table3")}
    claims = C.load_claims(EXPERIMENTS / "claims.toml", tables)
    by_table = {t: [c for c in claims if c.table == t] for t in tables}
    assert all(by_table.values())
    ids = {c.id for c in claims}
    for needed in ("T3-tkc-max-beats-dk-pgd", "T3-tkc-neuron-beats-dk-pgd", "T3-tkc-max-beats-neuron-pgd",
                   "T3-tkc-sum-below-dk-pgd", "T3-tkc-max-clean-within-2", "T1-dk-beats-baseline-pgd",
                   "T1-dk-clean-at-least-baseline", "T1-pruning-beats-baseline-pgd", "T2-dk-beats-pruning-final",
                   "T2-dk-final2-beats-final"):
        assert needed in ids, needed
    within = next(c for c in claims if c.id == "T3-tkc-max-clean-within-2")
    assert (within.direction, within.margin, within.paper) == ("equivalent", 0.02, [0.903, 0.921])


GOOD = """
[[claims]]
id = "x"
table = "table3"
a = "TKC-max"
b = "Dynamic-k"
metric = "pgd"
direction = "greater"
paper = [0.421, 0.324]
text = "TKC-max beats Dynamic-k."
"""


@pytest.mark.parametrize("change, message", [
    (('a = "TKC-max"', 'a = "TKC-mux"'), "unknown column 'TKC-mux'"),
    (('b = "Dynamic-k"', 'b = "Dynamic"'), "unknown column 'Dynamic'"),
    (('metric = "pgd"', 'metric = "cw"'), "unknown metric 'cw'"),
    (('paper = [0.421, 0.324]', 'paper = [0.421]'), "missing paper number"),
    (('paper = [0.421, 0.324]\n', ''), "missing paper number"),
    (('direction = "greater"', 'direction = "better"'), "unknown direction"),
    (('direction = "greater"', 'direction = "equivalent"'), "needs 'margin'"),
    (('table = "table3"', 'table = "table7"'), "unknown table"),
    (('text = "TKC-max beats Dynamic-k."', 'txt = "typo"'), "unknown key 'claims[1].txt'"),
])
def test_a_malformed_claim_is_an_error_naming_the_entry(tmp_path, change, message):
    path = tmp_path / "claims.toml"
    path.write_text(GOOD.replace('id = "x"', 'id = "first"') + GOOD.replace(*change), encoding="utf-8")
    table = load_table_spec(EXPERIMENTS / "table3-quick.toml")
    with pytest.raises(ValueError) as err:
        C.load_claims(path, {"table3": table})
    text = str(err.value)
    assert "claims.toml" in text and "claims[1]" in text and message in text, text


def test_repeated_ids_and_an_empty_file_are_errors(tmp_path):
    path = tmp_path / "claims.toml"
    path.write_text(GOOD + GOOD, encoding="utf-8")
    with pytest.raises(ValueError, match="id 'x' repeats"):
        C.load_claims(path)
    path.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="no \\[\\[claims\\]\\]"):
        C.load_claims(path)


def _seed(run, clean, pgd8, worst):
    """One seed's evaluations as reproduce stores them, with per-example outcome strings."""
    text = lambda v: "".join("1" if x else "0" for x in v)  # noqa: E731
    paper = {"per_example": {"clean": text(clean), "pgd": text(pgd8)},
             "attacks": {"pgd": {"params": {"eps": 8.0}, "accuracy": float(np.mean(pgd8))}}}
    strong = {"24": {"per_example": {"worst_case": text(worst)}, "suite": "full"}}
    return {"run": run, "paper": paper, "strong": strong}


def _column(rng, clean, pgd, worst, seeds=3, n=300):
    return [_seed(f"r{s}", rng.random(n) < clean, rng.random(n) < pgd, rng.random(n) < worst) for s in range(seeds)]


def test_verdicts_on_the_paper_attack_and_on_the_worst_case():
    """TKC-max clearly beats Dynamic-k under PGD but not under the strong suite (both near zero)."""
    rng = np.random.default_rng(0)
    results = {"TKC-max": _column(rng, 0.95, 0.7, 0.02), "Dynamic-k": _column(rng, 0.95, 0.3, 0.02)}
    claim = C.Claim(id="c", table="table3", a="TKC-max", b="Dynamic-k", metric="pgd", direction="greater",
                    paper=[0.421, 0.324], text="t")
    judged = C.judge(claim, results, [8.0], [24.0])
    verdicts = {row["measure"]: row["verdict"] for row in judged["verdicts"]}
    assert verdicts == {"pgd@8": "reproduced", "worst@24": "inconclusive"}
    assert judged["paper_difference"] == pytest.approx(0.097) and judged["paper_itself_agrees"]
    backwards = C.judge(C.Claim(**{**claim.__dict__, "direction": "less"}), results, [8.0], [24.0])
    assert backwards["verdicts"][0]["verdict"] == "contradicted"
    lines = C.console_lines([judged])
    assert lines[0].startswith("c: TKC-max > Dynamic-k") and "pgd@8" in lines[0] and "reproduced" in lines[0]
    text = C.render_markdown([judged], {"tables": "table3"})
    assert "| c: TKC-max > Dynamic-k" in text and "**reproduced**" in text and '"t"' in text


def test_equivalence_claim_on_clean_accuracy():
    rng = np.random.default_rng(1)
    same = _column(rng, 0.9, 0.5, 0.1, n=2000)
    results = {"A": same, "B": [dict(s) for s in same]}  # identical outcomes: the difference is exactly 0
    claim = C.Claim(id="e", table="table3", a="A", b="B", metric="clean", direction="equivalent", margin=0.02,
                    paper=[0.903, 0.921], text="t")
    judged = C.judge(claim, results, [8.0], [24.0])
    assert [row["measure"] for row in judged["verdicts"]] == ["clean"]
    assert judged["verdicts"][0]["verdict"] == "reproduced"
    worse = {"A": _column(rng, 0.6, 0.5, 0.1, n=2000), "B": results["B"]}
    assert C.judge(claim, worse, [8.0], [24.0])["verdicts"][0]["verdict"] == "contradicted"
