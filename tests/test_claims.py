"""The paper's claims as data: the real claims file, malformed entries, and verdicts from per-seed outcomes."""

import copy
from pathlib import Path

import numpy as np
import pytest

from topkconv.reproduce import claims as C
from topkconv.reproduce import Study, load_table_spec
from topkconv.reproduce import stats

EXPERIMENTS = Path(__file__).resolve().parents[1] / "src" / "topkconv" / "experiments"


@pytest.mark.parametrize("preset", ["quick", "paper"])
def test_the_claims_file_names_real_columns_of_every_table(preset):
    tables = {t: load_table_spec(EXPERIMENTS / f"{t}-{preset}.toml") for t in ("table1", "table2", "table3")}
    claims = [c for c in C.load_claims(EXPERIMENTS / "claims.toml", tables) if c.source == "paper"]
    assert {c.table for c in claims} == set(tables)  # the paper's claims are about its three tables only
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
    # one deciding measure per claim, declared in advance, and one the table's spec measures
    assert {c.decide for c in claims if c.metric == "pgd"} == {"worst@8"}
    assert {c.decide for c in claims if c.metric == "clean"} == {"clean"}
    assert {c.decide for c in claims if c.metric == "fgsm"} == {"fgsm@8"}
    for claim in claims:
        study = Study(tables[claim.table])
        assert claim.decide in C.measures_for(claim, study.eps_list(), study.strong_radii()), claim.id


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
decide = "worst@8"
"""


@pytest.mark.parametrize("change, message", [
    (('a = "TKC-max"', 'a = "TKC-mux"'), "unknown column 'TKC-mux'"),
    (('b = "Dynamic-k"', 'b = "Dynamic"'), "unknown column 'Dynamic'"),
    (('metric = "pgd"', 'metric = "cw"'), "unknown metric 'cw'"),
    (('paper = [0.421, 0.324]', 'paper = [0.421]'), "missing paper number"),
    (('paper = [0.421, 0.324]\n', ''), "missing paper number"),
    (('paper = [0.421, 0.324]', 'paper = [0.421, 0.324]\nsource = "project"'), "has no paper numbers"),
    (('paper = [0.421, 0.324]', 'paper = [0.421, 0.324]\nsource = "blog"'), "unknown source 'blog'"),
    (('direction = "greater"', 'direction = "better"'), "unknown direction"),
    (('direction = "greater"', 'direction = "equivalent"'), "needs 'margin'"),
    (('table = "table3"', 'table = "table7"'), "unknown table"),
    (('text = "TKC-max beats Dynamic-k."', 'txt = "typo"'), "unknown key 'claims[1].txt'"),
    (('decide = "worst@8"\n', ''), "key 'decide' is missing"),
    (('decide = "worst@8"', 'decide = "fgsm@8"'), "'decide' must be 'pgd@EPS' or 'worst@EPS'"),
    (('decide = "worst@8"', 'decide = "worst@x"'), "'decide' must be"),
    (('decide = "worst@8"', 'decide = "clean"'), "'decide' must be"),
    (('decide = "worst@8"', 'decide = "worst@8"\ndelta = 2'), "'delta' must be a fraction"),
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


def _claim(**changes):
    base = dict(id="c", table="table3", a="TKC-max", b="Dynamic-k", metric="pgd", direction="greater",
                paper=[0.421, 0.324], text="t", decide="pgd@8")
    return C.Claim(**{**base, **changes})


def test_the_deciding_measure_gives_the_verdict_and_the_others_only_support():
    """TKC-max clearly beats Dynamic-k under PGD but not under the strong suite (both near zero)."""
    rng = np.random.default_rng(0)
    results = {"TKC-max": _column(rng, 0.95, 0.7, 0.02), "Dynamic-k": _column(rng, 0.95, 0.3, 0.02)}
    judged = C.judge(_claim(), results, [8.0], [24.0])
    assert (judged["decide"], judged["verdict"]) == ("pgd@8", "reproduced") and judged["p_value"] < 0.05
    assert judged["decision"]["measure"] == "pgd@8" and judged["decision"]["difference"]["method"] == stats.T_SEEDS
    assert [row["measure"] for row in judged["supporting"]] == ["worst@24"]
    assert "verdict" not in judged["supporting"][0]
    assert judged["paper_difference"] == pytest.approx(0.097) and judged["paper_itself_agrees"]
    on_worst = C.judge(_claim(decide="worst@24"), results, [8.0], [24.0])
    assert on_worst["verdict"] in ("inconclusive", "no gain shown") and on_worst["supporting"][0]["measure"] == "pgd@8"
    backwards = C.judge(_claim(direction="less"), results, [8.0], [24.0])
    assert backwards["verdict"] == "contradicted"
    missing = C.judge(_claim(decide="worst@8"), results, [8.0], [24.0])
    assert missing["verdict"] == stats.NOT_MEASURED and missing["decision"] is None


def test_holm_adjusts_across_the_claims_of_a_report_and_the_report_shows_both():
    """Three decisive raw verdicts with p = 0.004, 0.03 and 0.04 (one-sided x 2): Holm keeps the first
    (0.004 x 3 = 0.012) and turns the other two inconclusive (0.03 x 2 = 0.06; 0.04 -> 0.06)."""
    judged = [_fake("x", 0.004, "reproduced"), _fake("y", 0.03, "contradicted"), _fake("z", 0.04, "no gain shown"),
              _fake("w", 0.5, "inconclusive"), {**_fake("v", 0.5, "not measured"), "decision": None, "p_value": None}]
    C.adjust(judged)
    assert [c["verdict_holm"] for c in judged] == ["reproduced", "inconclusive", "inconclusive", "inconclusive",
                                                   "not measured"]
    assert [c["p_holm"] for c in judged[:4]] == pytest.approx([0.016, 0.09, 0.09, 0.5])
    assert C.count(judged) == {"inconclusive": 3, "not measured": 1, "reproduced": 1}
    assert C.count(judged, "verdict") == {"contradicted": 1, "inconclusive": 1, "no gain shown": 1,
                                          "not measured": 1, "reproduced": 1}
    text = C.render_markdown(judged, C.count_lines(judged))
    assert "| x: s | worst@8 |" in text and "**reproduced**" in text and "Holm" in text
    assert "claims (after Holm)**: inconclusive: 3, not measured: 1, reproduced: 1" in text
    line = next(line for line in C.console_lines(judged) if line.startswith("y:"))
    assert "p=0.03 contradicted; Holm p=0.09 inconclusive; seeds needed 9 " in line, line


def _fake(claim_id, p, verdict):
    difference = {"mean": 0.1, "lo": 0.01, "hi": 0.19, "method": stats.T_SEEDS}
    decision = {"measure": "worst@8", "difference": difference, "verdict": verdict, "p_value": p,
                "seed_sd": 0.05, "seeds_needed": 9, "target_half_width": 0.05, "target_from": "half the paper's effect"}
    return {"id": claim_id, "statement": "s", "decide": "worst@8", "paper_difference": 0.1,
            "paper_itself_agrees": True, "decision": decision, "verdict": verdict, "p_value": p, "supporting": [],
            "text": "t"}


def test_an_inconclusive_claim_says_how_many_seeds_would_settle_it():
    """Per-seed differences +0.10, -0.05, +0.02 (SD 0.0751); the paper's effect +0.097, so a target half-width
    of 0.0485. On seeds alone that is S = 12 (tests/test_stats.py works it by hand); here the gains sit on the
    same examples in every seed, so the shared examples hold part of the half-width and it takes more."""
    from test_stats import _seed_differences

    a, b = _seed_differences((0.10, -0.05, 0.02))
    results = {"TKC-max": [_seed(f"r{i}", x, x, x) for i, x in enumerate(a)],
               "Dynamic-k": [_seed(f"r{i}", y, y, y) for i, y in enumerate(b)]}
    judged = C.adjust([C.judge(_claim(), results, [8.0], [24.0])])[0]
    assert judged["verdict_holm"] == "inconclusive"
    decision = judged["decision"]
    assert decision["seed_sd"] == pytest.approx(np.std([0.10, -0.05, 0.02], ddof=1), rel=1e-3)
    assert decision["target_half_width"] == pytest.approx(0.0485)
    assert 0 < decision["examples_half_width"] < 0.0485
    assert stats.seeds_needed(decision["seed_sd"], 0.0485) == 12
    assert decision["seeds_needed"] == stats.seeds_needed(decision["seed_sd"], 0.0485,
                                                          example_half=decision["examples_half_width"]) > 12
    line = C.console_lines([judged])[0]
    assert f"seeds needed {decision['seeds_needed']} (seed SD 0.075, +-" in line, line
    assert "half-width 0.048 = half the paper's effect +0.097)" in line
    assert C.count_lines([judged])["note"].startswith("every measured claim is inconclusive")


def test_equivalence_claim_on_clean_accuracy():
    rng = np.random.default_rng(1)
    same = _column(rng, 0.9, 0.5, 0.1, n=2000)
    results = {"A": same, "B": [dict(s) for s in same]}  # identical outcomes: the difference is exactly 0
    claim = C.Claim(id="e", table="table3", a="A", b="B", metric="clean", direction="equivalent", margin=0.02,
                    paper=[0.903, 0.921], text="t", decide="clean")
    judged = C.judge(claim, results, [8.0], [24.0])
    assert judged["decision"]["measure"] == "clean" and judged["supporting"] == []
    assert judged["verdict"] == "reproduced" and judged["decision"]["difference"]["method"] == stats.EXACT
    worse = {"A": _column(rng, 0.6, 0.5, 0.1, n=2000), "B": results["B"]}
    assert C.judge(claim, worse, [8.0], [24.0])["verdict"] == "contradicted"


def test_a_report_names_the_claims_file_relative_never_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    assert C.display_path(tmp_path / "mine" / "claims.toml") == "mine/claims.toml"
    assert C.display_path(C.default_path()) == "experiments/claims.toml"


def test_the_verdict_run_is_the_quick_table_with_ten_seeds_and_shares_its_runs(tmp_path):
    """experiments/table3-verdict.toml: the main job's table with >= 10 seeds and only attack budgets raised
    (the indicators on 100 examples, the binarization test on 20, AutoAttack's standard version at 100
    iterations and Square at 5,000 queries, AutoAttack cascaded), so seeds 0-2 are the main job's cached
    trainings; it plans 10 trainings and 3 evaluations (the paper's attacks, the strong suite at 8 and 24) per
    column, and every claim of Table III fits it."""
    from topkconv.reproduce import Workspace, spec_path
    from topkconv.reproduce.driver import load_study

    quick = load_table_spec(EXPERIMENTS / "table3-quick.toml")
    verdict = load_table_spec(EXPERIMENTS / "table3-verdict.toml")
    assert verdict.seeds >= 10 and quick.seeds == 3
    differing = {key for key in vars(quick) if getattr(quick, key) != getattr(verdict, key)}
    assert differing == {"seeds", "title", "path", "base"}
    attack = verdict.base["attack"]
    assert (attack["indicators"]["examples"], attack["indicators"]["binarization_examples"]) == (100, 20)
    assert attack["autoattack"] == {"iterations": 100, "attacks": []} and attack["square"] == {"queries": 5000}
    assert attack["cascade_attacks"] == ["autoattack"] + quick.base["attack"]["cascade_attacks"]
    unraised = copy.deepcopy(verdict.base)
    for key in ("examples", "binarization_examples"):
        unraised["attack"]["indicators"][key] = quick.base["attack"]["indicators"][key]
    for key in ("autoattack", "square", "cascade_attacks"):
        unraised["attack"][key] = quick.base["attack"][key]
    assert unraised == quick.base  # nothing else in the base differs
    study = load_study("table3", "quick", EXPERIMENTS / "table3-verdict.toml", {}, None)
    main = load_study("table3", "quick", spec_path("table3", "quick"), {}, None)
    for label in quick.labels:
        for seed in range(3):
            assert study.run_spec(label, seed).hash() == main.run_spec(label, seed).hash()
    planned, cached = Workspace(tmp_path).plan([study])
    steps = [job.step for job in planned]
    assert (steps.count("train"), steps.count("evaluate"), cached) == (10 * 5, 10 * 5 * 3, [])
    claims = C.load_claims(EXPERIMENTS / "claims.toml", {"table3": verdict})
    assert len([c for c in claims if c.table == "table3"]) == 7


def test_the_zeroth_order_reference_override_raises_only_that_budget_and_keeps_the_trainings():
    """``reproduce --zo-reference`` on the verdict preset: every run's zeroth-order attack at 100% of its reference
    on every example (so nothing below a reference is left in the plan), the rest of the attack config and the
    trainings' hashes unchanged."""
    from topkconv.attacks.zeroth_order import reference_budget
    from topkconv.reproduce.driver import load_study

    path = EXPERIMENTS / "table3-verdict.toml"
    plain = load_study("table3", "quick", path, {}, None)
    raised = load_study("table3", "quick", path, {"attack": {"zeroth_order": reference_budget()}}, None)
    for label in plain.table.labels:
        before, after = plain.run_spec(label, 1), raised.run_spec(label, 1)
        assert before.hash() == after.hash()   # the same cached training
        share = after.attack.budget("zeroth_order").reference_fraction()
        assert share["fraction"] == 1.0 and not share["below_reference"]
        assert before.attack.budget("zeroth_order").reference_fraction()["below_reference"]
        assert after.attack.budget("zeroth_order").max_batch == before.attack.budget("zeroth_order").max_batch
        unchanged = {name: budget for name, budget in after.attack.budgets.items() if name != "zeroth_order"}
        assert unchanged == {name: budget for name, budget in before.attack.budgets.items() if name != "zeroth_order"}


def test_a_claim_the_test_examples_alone_cannot_settle_says_so():
    decision = {"difference": {"method": stats.T_SEEDS}, "seeds_needed": None, "target_half_width": 0.014,
                "examples_half_width": 0.032, "seed_sd": 0.014, "target_from": "half the paper's effect -0.028"}
    text = C._seeds_text({"decision": decision, "verdict_holm": "inconclusive"})
    assert text.startswith("none: the shared test examples alone give +-0.032") and "more test examples" in text
    assert C._seeds_text({"decision": decision, "verdict_holm": "reproduced"}) == ""


def test_table_cells_show_the_exact_bound_marked_and_say_how_intervals_were_made():
    from topkconv.reproduce import tables

    zero = stats.cell_estimate([np.zeros(100, np.int8)] * 3)
    assert tables.cell_text(zero) == "0.000 [0.00, 0.01]" + tables.EXACT_MARK
    rng = np.random.default_rng(2)
    mixed = stats.cell_estimate([(rng.random(100) < p).astype(np.int8) for p in (0.3, 0.5, 0.4)])
    assert tables.cell_text(mixed).endswith("]") and tables.cell_text(stats.Estimate.from_dict(mixed.as_dict())) \
        == tables.cell_text(mixed)
    assert "Student's t over the 3 seed accuracies (df 2)" in tables.interval_note(3)
    assert "Clopper-Pearson" in tables.interval_note(1) and "not measured" in tables.interval_note(1)


# ---------------------------------------------------------------- the AT table: the project's own questions

AT_LABELS = ("Baseline", "Baseline + AT", "Dynamic-k + AT", "TKC-max + AT")


@pytest.mark.parametrize("preset", ["quick", "fashion"])
def test_the_at_claims_are_the_projects_own_and_decided_where_the_spec_measures(preset):
    """Every tableat claim names a real column, carries no paper numbers, and decides robustness on the strong
    suite's worst case at the preset's training radius (24/255 quick, 8/255 fashion), which its strong suite runs."""
    table = load_table_spec(EXPERIMENTS / f"tableat-{preset}.toml")
    assert table.table == "tableat" and tuple(table.labels) == AT_LABELS and table.preset == preset
    at = [c.for_preset(preset) for c in C.load_claims(EXPERIMENTS / "claims.toml", {"tableat": table})
          if c.table == "tableat"]
    assert {c.id for c in at} >= {"AT-control-beats-baseline-pgd", "AT-dk-adds-to-at-pgd", "AT-tkc-max-adds-to-at-pgd",
                                  "AT-costs-clean-accuracy", "AT-dk-clean-at-least-at", "AT-tkc-max-clean-at-least-at"}
    study = Study(table)
    radius = table.run_spec("Baseline + AT").train.adversarial.eps
    assert radius in study.strong_radii()
    for claim in at:
        assert (claim.source, claim.paper, claim.paper_difference) == ("project", [], None), claim.id
        assert {claim.a, claim.b} <= set(table.labels)
        assert claim.decide == ("clean" if claim.metric == "clean" else f"worst@{radius:g}"), claim.id
        assert claim.decide in C.measures_for(claim, study.eps_list(), study.strong_radii()), claim.id
    # the open question compares routing + AT with the AT Baseline, and "no gain shown" is reachable (delta)
    assert {(c.a, c.b) for c in at if c.metric == "pgd" and c.b == "Baseline + AT"} == {
        ("Dynamic-k + AT", "Baseline + AT"), ("TKC-max + AT", "Baseline + AT")}


def test_decide_by_preset_is_checked_like_decide():
    with pytest.raises(ValueError, match="'decide_by_preset' names preset 'mnist'"):
        C._check(_at_claim(decide_by_preset={"mnist": "worst@8"}), None)
    with pytest.raises(ValueError, match="'decide' must be"):
        C._check(_at_claim(decide_by_preset={"fashion": "fgsm@8"}), None)
    claim = _at_claim(decide_by_preset={"fashion": "worst@8"})
    assert (claim.for_preset("fashion").decide, claim.for_preset("quick").decide) == ("worst@8", "worst@24")


def _at_claim(**changes):
    base = dict(id="q", table="tableat", source="project", a="Baseline + AT", b="Baseline", metric="pgd",
                direction="greater", text="a question", decide="worst@24")
    return C.Claim(**{**base, **changes})


def test_a_project_question_gets_a_verdict_and_a_seed_target_without_a_paper_effect():
    """AT clearly helps (worst case 0.6 vs 0.1): shown. Identical columns: no gain shown (delta). An open one
    aims its seeds at half of delta, and the report never calls these the paper's claims."""
    rng = np.random.default_rng(3)
    results = {"Baseline + AT": _column(rng, 0.9, 0.7, 0.6), "Baseline": _column(rng, 0.95, 0.3, 0.1)}
    same = _column(rng, 0.9, 0.6, 0.5, n=2000)
    results.update({"TKC-max + AT": same, "Dynamic-k + AT": [dict(s) for s in same]})
    shown = C.judge(_at_claim(), results, [8.0], [24.0])
    assert shown["verdict"] == "reproduced" and shown["paper_difference"] is None
    assert shown["paper_itself_agrees"] is None and shown["source"] == "project"
    nothing = C.judge(_at_claim(a="TKC-max + AT", b="Dynamic-k + AT", delta=0.03), results, [8.0], [24.0])
    assert nothing["verdict"] == "no gain shown"
    a, b = [_seed(f"r{i}", x, x, x) for i, x in enumerate(_noisy(rng))], _column(rng, 0.5, 0.5, 0.5)
    open_one = C.judge(_at_claim(a="Dynamic-k + AT", b="Baseline"), {"Dynamic-k + AT": a, "Baseline": b},
                       [8.0], [24.0])
    assert open_one["decision"]["target_half_width"] == pytest.approx(0.01)
    assert open_one["decision"]["target_from"].startswith("half of delta 0.02 (no paper effect")
    judged = C.adjust([shown, nothing, open_one])
    text = C.render_markdown(judged, C.count_lines(judged))
    assert text.startswith("# The project's own questions, tested") and "The paper's claims" not in text
    assert C.PROJECT_MARK in text and "(the project's own question; the paper makes no such claim)" in text
    assert all("(the project's question)" in line for line in C.console_lines(judged))
    assert C.heading(judged + [{"source": "paper"}]) == "The paper's claims and the project's own questions"


def _noisy(rng, n=300):
    """Three seeds whose worst-case accuracy swings widely (0.3, 0.7, 0.5): an inconclusive gain."""
    return [rng.random(n) < p for p in (0.3, 0.7, 0.5)]
