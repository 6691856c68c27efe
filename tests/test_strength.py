"""Attack strength through `evaluate`: the binarization test of the evaluation's strongest white-box attack,
budgets as fractions of their reference, sign-test labels under the cascade and stochastic models over draws."""

from __future__ import annotations

import dataclasses

import pytest

from masked_models import RoundedInput
from topkconv.config import AttackConfig
from topkconv.evaluate import evaluate

# A cheap full suite at the digits' radius of the audit tests (32/255: a plain CNN falls far under PGD there):
# no zeroth-order attack, short AutoAttack and Square, few indicator draws; the binarization test on 12 examples.
CHEAP_FULL = AttackConfig(suite="full", eps=32, eps_curve=[], n_examples=40, batch_size=64, seed=0,
                          budgets={"pgd": {"step_size": 5.0, "steps": 16}, "eot_pgd": {"samples": 4},
                                   "autoattack": {"iterations": 10, "attacks": ["apgd-ce"]},
                                   "square": {"queries": 50}, "zeroth_order": {"steps": 0}},
                          indicators={"examples": 12, "draws": 5, "steps": 10, "binarization_examples": 12})


@pytest.fixture(scope="module")
def evaluated(cnn, digits_test):
    cache = {}

    def run(name: str) -> dict:
        if name not in cache:
            model = cnn if name == "plain" else RoundedInput(cnn)
            cache[name] = evaluate(model, *digits_test, CHEAP_FULL, progress=False)
        return cache[name]

    return run


def test_binarization_passes_for_the_evaluations_pgd_on_a_plain_cnn(evaluated):
    result = evaluated("plain")
    test = result["indicators"]["binarization"]
    print("plain CNN:", {k: v for k, v in test.items() if k != "outcomes"})
    assert test["attack"] in result["attacks"] and test["fails"] + test["passes"] + test["invalid"] == 12
    assert test["verdict"] == "pass" and test["value"] >= 0.9 and test["interval"][1] >= 0.9
    assert not result["verdict"]["text"].startswith("attack too weak")


def test_binarization_fails_on_a_gradient_masked_cnn_and_the_verdict_says_the_attack_is_too_weak(evaluated):
    result = evaluated("masked")
    test = result["indicators"]["binarization"]
    print("rounded-input CNN:", {k: v for k, v in test.items() if k != "outcomes"}, result["verdict"])
    assert test["verdict"] == "flag" and test["interval"][1] < CHEAP_FULL.indicators.binarization_threshold
    # Square beats PGD on every example here, so "masking shown" keeps the line and says the attack is too weak
    assert result["verdict"]["verdict"] == "masking shown" and result["verdict"]["attack_too_weak"] is True


def test_a_failed_binarization_test_overrides_the_indicators_in_the_verdict():
    from topkconv.attacks.indicators import verdict

    failed = {"verdict": "flag", "attack": "pgd_zero", "passes": 1, "fails": 11, "interval": [0.002, 0.38],
              "confidence": 0.95, "threshold": 0.9}
    line = verdict({"pgd": 0.5, "square": 0.5}, {"binarization": failed, "randomness": {"verdict": "flag"}},
                   ["pgd"], n=100)
    assert line["verdict"] == "attack too weak" and line["flags"] == ["binarization", "randomness"]
    assert line["text"] == ("attack too weak: robust accuracy not trustworthy (binarization test of pgd_zero: 1 of 12 "
                            "passed, 95% interval [0.00, 0.38], below 0.90)")
    passed = dict(failed, verdict="pass")
    assert verdict({"pgd": 0.5}, {"binarization": passed}, ["pgd"], n=100)["verdict"] == "no masking indicated"


def test_binarization_is_off_with_zero_examples_and_in_the_paper_suite(cnn, digits_test):
    off = dataclasses.replace(CHEAP_FULL, indicators=dataclasses.replace(CHEAP_FULL.indicators,
                                                                         binarization_examples=0))
    result = evaluate(cnn, *digits_test, dataclasses.replace(off, n_examples=10), progress=False)
    assert result["indicators"]["binarization"]["verdict"] == "n/a"
    paper = evaluate(cnn, *digits_test, dataclasses.replace(CHEAP_FULL, suite="paper", n_examples=10),
                     progress=False)
    assert "binarization" not in paper["indicators"]


# ---------------------------------------------------------------- budgets as fractions of their reference

def test_budgets_below_their_reference_make_the_verdict_provisional(evaluated, tmp_path):
    from topkconv.evaluate import write_results

    result = evaluated("plain")
    budgets = result["budgets"]
    assert budgets["square"]["fraction"] == pytest.approx(50 / 5000) and budgets["square"]["below_reference"]
    assert budgets["autoattack"]["fraction"] == pytest.approx(10 / 100)
    assert budgets["pgd"]["fraction"] == 1.0 and not budgets["pgd"]["below_reference"]   # the paper's 16 steps
    assert "pgd_zero" in budgets["pgd"]["attacks"] and "zeroth_order" not in budgets   # steps = 0: it did not run
    assert result["verdict"]["provisional"] is True and "square 1% of" in result["verdict"]["reason"]
    write_results(result, tmp_path / "eval.json", title="cnn")
    first_lines = (tmp_path / "eval.md").read_text().splitlines()[:3]
    assert first_lines[2].startswith("**Verdict: PROVISIONAL: ") and "square" in first_lines[2]


@pytest.mark.parametrize("steps, provisional", [(16, False), (8, True)])
def test_the_paper_suite_at_the_papers_budget_is_not_provisional(steps, provisional, cnn, digits_test):
    cfg = dataclasses.replace(CHEAP_FULL, suite="paper", n_examples=10).with_budget("pgd", steps=steps)
    result = evaluate(cnn, *digits_test, cfg, progress=False)
    assert result["budgets"]["pgd"]["fraction"] == steps / 16
    assert result["verdict"]["provisional"] is provisional


def test_zeroth_order_fraction_counts_pairs_over_steps():
    from topkconv.attacks.zeroth_order import ZerothOrderBudget

    assert ZerothOrderBudget().reference_fraction()["fraction"] == 1.0   # 20 x 50 + 20 x 500 + 60 x 10,000 pairs
    quick = ZerothOrderBudget(steps=10, samples=[[0, 20]], examples=20).reference_fraction()   # the quick preset's
    assert quick["fraction"] == pytest.approx(200 / 611000) and quick["below_reference"]
    at_size_on_some = ZerothOrderBudget(examples=20).reference_fraction()
    assert at_size_on_some["fraction"] == 1.0 and at_size_on_some["below_reference"]


@pytest.mark.parametrize("n, below", [(20, False), (15, False), (21, True), (None, True)],
                         ids=["all-of-them", "more-than-asked", "some-of-them", "unknown-n"])
def test_a_limit_on_the_examples_at_or_above_those_evaluated_is_no_limit(n, below):
    """``evaluate --zo-examples 100`` on 100 examples attacks every one: at the reference size, not below it."""
    from types import SimpleNamespace

    from topkconv.attacks.zeroth_order import ZerothOrderBudget
    from topkconv.config import AttackConfig
    from topkconv.evaluate.strength import budget_fractions

    cfg = AttackConfig().with_budget("zeroth_order", **vars(ZerothOrderBudget(examples=20)))
    plan = SimpleNamespace(attacks=[SimpleNamespace(name="zeroth_order", entry=SimpleNamespace(
        budget_name="zeroth_order"))])
    share = budget_fractions(plan, cfg, n)["zeroth_order"]
    assert share["fraction"] == 1.0 and share["below_reference"] is below and share["attacks"] == ["zeroth_order"]


@pytest.mark.parametrize("attacks, below", [
    ([], False),
    (["apgd-ce", "apgd-t", "fab-t", "square"], False),
    (["square", "apgd-dlr", "fab-t", "apgd-t", "apgd-ce"], False),
    (["apgd-ce", "apgd-dlr"], True),
    (["apgd-ce", "apgd-t", "fab-t"], False),
    (["apgd-ce", "apgd-t", "square"], True),
], ids=["the-versions-own", "standard-named", "standard-and-more", "quick-pair", "square-as-the-suites-own-row",
        "no-fab-t"])
def test_autoattack_is_at_its_reference_only_with_all_of_the_standard_attacks(attacks, below):
    """Square may be left to the full suite's own ``square`` row (its budget is judged there)."""
    from topkconv.attacks.autoattack import AutoAttackBudget

    share = AutoAttackBudget(iterations=100, attacks=attacks).reference_fraction()
    assert share["fraction"] == 1.0 and share["below_reference"] is below


# ---------------------------------------------------------------- a random model judged over draws

def test_a_random_model_is_judged_over_draws_and_its_worst_case_is_taken_within_each_draw(sap_mlp, digits_test):
    cfg = dataclasses.replace(CHEAP_FULL, suite="paper", eps=16, n_examples=60,
                              budgets={**CHEAP_FULL.budgets}).with_budget("eot_pgd", samples=4, evaluation_draws=12)
    result = evaluate(sap_mlp, *digits_test, cfg, progress=False)
    assert result["model"]["stochastic"] is True
    worst = result["worst_case"]["over_draws"]
    assert worst["draws"] == 12 and len(worst["by_draw"]) == 12
    assert worst["worst"] == min(worst["by_draw"]) and worst["expected"] == pytest.approx(sum(worst["by_draw"]) / 12)
    assert worst["interval"][0] <= worst["expected"] <= worst["interval"][1]
    assert result["over_draws"]["worst_case"] == worst
    attacks = {name: a["over_draws"] for name, a in result["attacks"].items()}
    # within a draw the worst case is at most every attack's accuracy in that draw
    for r in range(12):
        assert worst["by_draw"][r] <= min(a["by_draw"][r] for a in attacks.values()) + 1e-12
    # a single draw's AND across the attacks (the old rule) counts the model's luck against it: it is lower
    print({"one-draw AND": result["worst_case"]["accuracy"], "expected": worst["expected"], "worst": worst["worst"]})
    assert result["worst_case"]["accuracy"] <= worst["expected"]
    # the SAP model differs from draw to draw, or this test would not test anything
    assert max(worst["by_draw"]) > min(worst["by_draw"])


@pytest.mark.parametrize("draws", [100, 1])
def test_the_binarization_test_of_a_random_model_averages_its_features_over_draws(sap_mlp, digits_test, draws):
    """EOT-PGD 16 x 16 on SAP: judged on features averaged over 100 passes it passes (measured: 11 of 11 valid);
    on one draw fresh draws undo the corners the readout was fitted on, so almost no task is valid (11 of 12
    invalid), and the few left cannot say "too weak" (before validity was judged anew, one draw made the test
    wrongly flag the attack: 5 of 12 passed). The evaluation seeds the model for the test, so these hold
    whatever ran before."""
    cfg = dataclasses.replace(CHEAP_FULL, indicators=dataclasses.replace(CHEAP_FULL.indicators,
                                                                         binarization_draws=draws))
    result = evaluate(sap_mlp, *digits_test, cfg.with_budget("eot_pgd", samples=16), progress=False)
    found = result["indicators"]["binarization"]
    print(draws, {k: found.get(k) for k in ("passes", "fails", "invalid", "known_rate", "verdict")})
    assert (found["attack"], found["draws"]) == ("eot_pgd", draws), found
    if draws == 100:
        assert found["verdict"] == "pass" and found["invalid"] <= 4 and found["pass_rate"] >= 0.9, found
    else:
        assert found["invalid"] >= 9 and found["verdict"] != "flag", found
    assert result["verdict"]["verdict"] != "attack too weak"


def test_binarization_draws_below_one_are_refused():
    with pytest.raises(ValueError, match="attack.indicators.binarization_draws"):
        AttackConfig(indicators={"binarization_draws": 0})


@pytest.mark.parametrize("value, expected", [("400", 400), ("0", "argument --binarization-draws: expected an "
                                                                 "integer >= 1, got 0")], ids=["set", "zero"])
def test_cli_binarization_draws_override_the_runs_and_zero_is_refused_by_name(value, expected, tmp_path, capsys):
    """A run's spec pins the draws it was made with (earlier runs: 20); the flag is how an evaluation raises them."""
    import json

    from test_evaluate import _tiny_checkpoint
    from topkconv.cli import main

    run = _tiny_checkpoint(tmp_path / "run", defense="standard")
    try:
        status = main(["evaluate", str(run), "--n", "4", "--no-progress", "--binarization-draws", value])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    if isinstance(expected, int):
        assert status == 0
        assert json.loads((run / "eval.json").read_text())["config"]["indicators"]["binarization_draws"] == expected
    else:
        assert status == 2 and expected in capsys.readouterr().err and not (run / "eval.json").exists()


@pytest.mark.parametrize("stochastic, first", [(True, "eot_pgd"), (False, "pgd_random")], ids=["random", "plain"])
def test_a_random_models_binarization_attack_is_its_eot_attack_whatever_one_draw_ranked(stochastic, first, sap_mlp,
                                                                                       digits_test):
    """One draw per attack can rank plain PGD above EOT-PGD on a random model; plain PGD against the binarized
    random model is no test of the suite (on Fashion-MNIST's SAP it found none of 18 valid examples)."""
    from types import SimpleNamespace

    from topkconv.evaluate.plan import model_traits, plan_attacks
    from topkconv.evaluate.strength import whitebox_candidates

    cfg = AttackConfig(suite="full", eps=8, eps_curve=[])
    plan = plan_attacks(sap_mlp, cfg, model_traits(sap_mlp, digits_test[0][:8]))
    ranked = {a.name: 0.9 for a in plan.at_main_eps()} | {"pgd_random": 0.40, "eot_pgd": 0.55}
    names = [a.name for a in whitebox_candidates(plan, SimpleNamespace(acc=ranked), stochastic)]
    assert names[0] == first and {"pgd_random", "eot_pgd"} <= set(names)


def test_a_deterministic_model_has_no_draws(evaluated):
    assert evaluated("plain")["over_draws"] is None and "over_draws" not in evaluated("plain")["worst_case"]


def test_fewer_than_ten_evaluation_draws_are_refused():
    with pytest.raises(ValueError, match="evaluation_draws.*>= 10"):
        AttackConfig(budgets={"eot_pgd": {"evaluation_draws": 3}})


def test_an_earlier_eval_json_with_transfer_failure_reads_as_baseline_transfer(tmp_path):
    import json

    from topkconv.reproduce.workspace import read_evaluation

    old = {"reproduce_key": {}, "indicators": {"transfer_failure": {"verdict": "pass"}, "randomness": {}},
           "strong": [{"indicators": {"transfer_failure": {"verdict": "flag"}}}]}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(old))
    result, problem = read_evaluation(path)
    assert problem is None and list(result["indicators"]) == ["baseline_transfer", "randomness"]
    assert result["strong"][0]["indicators"] == {"baseline_transfer": {"verdict": "flag"}}


# ---------------------------------------------------------------- strength curves

def test_strength_curves_flag_a_budget_that_is_still_falling_and_not_one_that_flattened(cnn, digits_test, tmp_path):
    from topkconv.evaluate.curves import CurveConfig, strength_curves, write_curves

    cfg = AttackConfig(eps=32)
    short = CurveConfig(examples=60, steps=[1, 2], restarts=[1, 2], restart_steps=1, eps=[4, 32, 255],
                        zo_shares=[0.0005, 0.001])
    found = strength_curves(cnn, *digits_test, cfg, short)
    print({name: [p["accuracy"] for p in c["points"]] for name, c in found["curves"].items()})
    # 1 -> 2 steps of 2.5 eps / steps: the second step still breaks many examples
    assert found["curves"]["steps"]["still_falling"] and "steps" in found["still_falling"]
    by_eps = [p["accuracy"] for p in found["curves"]["eps"]["points"]]
    assert by_eps[-1] < 0.1 and by_eps == sorted(by_eps, reverse=True)   # unbounded: one step nearly always wins
    # the zeroth-order attack at 0.05% and 0.1% of the reference's pairs (340 and 640 an example): it removes most
    # of the accuracy without a gradient, and doubling its pairs still removes more than a point
    zo = found["curves"]["zeroth_order"]
    assert [p["pairs"] for p in zo["points"]] == [340, 640]
    assert zo["points"][-1]["accuracy"] < found["clean"] - 0.5 and "zeroth_order" in found["still_falling"]
    long = CurveConfig(examples=60, steps=[50, 100], restarts=[1, 2], restart_steps=50, eps=[32], zo_shares=[])
    converged = strength_curves(cnn, *digits_test, cfg, long)
    print({name: [p["accuracy"] for p in c["points"]] for name, c in converged["curves"].items()})
    assert converged["still_falling"] == [] and converged["text"].startswith("flattened")
    write_curves(found, tmp_path / "eval.json")
    assert (tmp_path / "strength-curves.json").is_file()
    assert (tmp_path / "strength-curves.png").read_bytes()[:4] == b"\x89PNG"
    write_curves(found, tmp_path / "eval-strong.json")   # beside another evaluation: named after it
    assert (tmp_path / "eval-strong-strength-curves.json").is_file()
    assert (tmp_path / "eval-strong-strength-curves.png").is_file()


def test_curve_budgets_must_end_on_a_doubling():
    from topkconv.evaluate.curves import CurveConfig

    with pytest.raises(ValueError, match="steps.*doubling"):
        CurveConfig(steps=[10, 100, 1000])
    with pytest.raises(ValueError, match="zo_shares.*doubling"):
        CurveConfig(zo_shares=[0.01, 0.1])
    with pytest.raises(ValueError, match=r"zo_shares: expected shares of the reference budget in \(0, 1\]"):
        CurveConfig(zo_shares=[1.0, 2.0])


@pytest.mark.parametrize("args,words", [
    (["--curves-zo-share", "0.5"], "draws no curve without --curves N"),
    (["--suite", "full", "--curves", "0", "--curves-zo-share", "0.5"], "draws no curve without --curves N"),
    (["--curves", "4", "--curves-zo-share", "1.5"], "expected a share in (0, 1], got 1.5"),
], ids=["share-without-curves", "share-with-curves-0", "share-above-one"])
def test_cli_curves_zo_share_errors_name_the_flag(args, words, tmp_path, capsys):
    from test_evaluate import _tiny_checkpoint
    from topkconv.cli import main

    run = _tiny_checkpoint(tmp_path / "run", defense="standard")
    try:
        status = main(["evaluate", str(run), "--n", "4", "--no-progress", *args])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    assert status == 2 and words in capsys.readouterr().err


def test_cli_evaluate_curves_writes_the_curves_beside_eval_json(tmp_path, capsys):
    import json

    from test_evaluate import _tiny_checkpoint
    from topkconv.cli import main

    run = _tiny_checkpoint(tmp_path / "run", defense="standard")
    assert main(["evaluate", str(run), "--n", "4", "--curves", "4", "--no-progress"]) == 0
    curves = json.loads((run / "strength-curves.json").read_text())
    assert [p["x"] for p in curves["curves"]["steps"]["points"]] == [10, 20, 50, 100, 200, 500, 1000]
    assert [p["x"] for p in curves["curves"]["eps"]["points"]][-1] == 255 and curves["n"] == 4
    assert [p["x"] for p in curves["curves"]["zeroth_order"]["points"]] == [0.0025, 0.005, 0.01]
    assert (run / "strength-curves.png").is_file() and "strength curves" in capsys.readouterr().out


def test_a_cascaded_row_of_a_random_model_is_judged_within_each_draw(sap_mlp, digits_test):
    cfg = dataclasses.replace(CHEAP_FULL, eps=16, n_examples=60, cascade_attacks=["square"],
                              indicators=dataclasses.replace(CHEAP_FULL.indicators, binarization_examples=0))
    result = evaluate(sap_mlp, *digits_test, cfg, progress=False)
    attacks = result["attacks"]
    base = attacks["square"]["params"]["cascade"]["after"]
    square = attacks["square"]["over_draws"]["by_draw"]
    for r in range(len(square)):   # "white-box and square" within draw r: at most every reference attack's
        assert square[r] <= min(attacks[name]["over_draws"]["by_draw"][r] for name in base) + 1e-12
    worst = result["worst_case"]["over_draws"]["by_draw"]
    assert all(worst[r] <= square[r] + 1e-12 for r in range(len(square)))
