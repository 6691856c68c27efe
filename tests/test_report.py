"""Report text: the paper's published numbers beside ours (Markdown and console), and one evaluation's Markdown."""

from topkconv import report


def _eval(suite, clean, attacks, eps=8.0, worst=None, flags=(), kind=None):
    """An eval dict shaped as topkconv.evaluate.evaluate returns it."""
    checks = {"pgd_beats_fgsm": {"verdict": "pass"}, "falls_to_chance": {"verdict": "n/a"}}
    checks.update({name: {"verdict": "flag"} for name in flags})
    text = f"masking suspected (indicators {', '.join(flags)})" if flags else "no masking indicated"
    return {"suite": suite, "clean": clean, "indicators": checks, "masking_checks": checks,
            "verdict": {"verdict": kind or text.split(" (")[0], "text": text},
            "attacks": {name: {"accuracy": acc, "params": {"eps": e}, "n": 10, "seconds": 0.1}
                        for name, (acc, e) in attacks.items()},
            "worst_case": {"accuracy": worst if worst is not None else 0.0, "eps": eps, "n": 10}}


def _table():
    header = ["Attack", "Baseline ours", "Baseline paper", "TKC-max ours", "TKC-max paper"]
    rows = [["None", 0.9, 0.895, 0.91, 0.903], ["PGD", 0.7, 0.084, 0.5, 0.421],
            ["Gradient-masking flags", "none", None, "bpda_not_stronger@8", None]]
    return report.Table("table3", "Table III", header, rows, ["a note"],
                        headline=["TKC-max: eps=8: masking suspected (1/1 seeds)"])


def test_markdown_and_console_show_ours_beside_the_papers():
    md = report.render_markdown(_table(), {"preset": "quick", "hardware": "cpu"})
    assert "| Attack | Baseline ours | Baseline paper | TKC-max ours | TKC-max paper |" in md
    assert "| PGD | 0.700 | 0.084 | 0.500 | 0.421 |" in md
    assert "**preset**: quick" in md and "**hardware**: cpu" in md and "paper columns" in md and "a note" in md
    assert md.splitlines()[2] == "**Masking verdicts** (strong suite):"
    console = report.render_console(_table())
    assert "TKC-max (ours / paper)" in console and "0.500 / 0.421" in console
    assert "bpda_not_stronger@8" in console and "masking: TKC-max: eps=8" in console


def test_masking_flags_and_verdicts_are_read_per_strong_eps():
    strong8 = _eval("full", 0.8, {"pgd": (0.3, 8.0)}, 8.0, 0.2)
    strong24 = _eval("full", 0.8, {"pgd": (0.1, 24.0)}, 24.0, 0.05, flags=("selection_flip_rate",))
    paper = _eval("paper", 0.8, {"pgd": (0.3, 8.0)})
    column = {"paper": paper, "strong": {"8": strong8, "24": strong24}}
    assert report.masking_flags(column) == ["selection_flip_rate@24"]
    assert [(v["eps"], v["verdict"]) for v in report.masking_verdicts(column)] == [
        (8.0, "no masking indicated"), (24.0, "masking suspected")]
    assert report.masking_verdicts({"paper": paper, "strong": {}}) == []   # the paper suite has no verdict line


def test_the_verdict_count_reads_the_structured_field_not_the_text():
    from topkconv.reproduce.measures import masking_verdicts

    shown = _eval("full", 0.8, {"pgd": (0.3, 8.0)}, 8.0, 0.2, kind="masking shown")
    shown["verdict"]["text"] = "square beat pgd by 5.0 points"   # a reworded line must not change the count
    quiet = _eval("full", 0.8, {"pgd": (0.3, 8.0)}, 8.0, 0.2)
    seeds = [{"paper": quiet, "strong": {"8": part}} for part in (shown, shown, quiet)]
    assert masking_verdicts(seeds) == "eps=8: masking shown (2/3 seeds); eps=8: no masking indicated (1/3 seeds)"


def test_the_verdict_count_keeps_attack_not_converged_apart_from_an_older_masking_suspected():
    """A new eval.json says "attack not converged" for convergence flags alone; one written before keeps the
    "masking suspected" it was judged with, and both are counted as what they say."""
    from topkconv.reproduce.measures import masking_verdicts

    new = _eval("full", 0.8, {"pgd": (0.3, 8.0)}, 8.0, 0.2, flags=("steps_restarts_converged",),
                kind="attack not converged")
    old = _eval("full", 0.8, {"pgd": (0.3, 8.0)}, 8.0, 0.2, flags=("steps_restarts_converged",))
    seeds = [{"paper": old, "strong": {"8": part}} for part in (new, new, old)]
    assert masking_verdicts(seeds) == ("eps=8: attack not converged (2/3 seeds); "
                                       "eps=8: masking suspected (1/3 seeds)")


def test_one_evaluation_as_markdown_starts_with_its_verdict():
    result = {"suite": "full", "n_examples": 10, "clean": 0.9, "model": {"routing": True},
              "verdict": {"text": "masking shown: attack zeroth_order beat attack pgd by 30.0 points"},
              "attacks": {"pgd": {"accuracy": 0.5, "params": {"eps": 8}, "n": 10, "seconds": 1.25},
                          "zeroth_order": {"accuracy": 0.2, "params": {"eps": 8}, "n": 10, "seconds": 30.0}},
              "worst_case": {"eps": 8, "accuracy": 0.2, "attacks": ["pgd", "zeroth_order"], "n": 10},
              "worst_cases": [{"eps": 8, "accuracy": 0.2, "attacks": ["pgd", "zeroth_order"], "n": 10}],
              "indicator_examples": 10,
              "indicators": {"gradient_agreement": {"value": 0.05, "threshold": 0.2, "verdict": "flag"},
                             "transfer_failure": {"value": None, "threshold": None, "verdict": "n/a",
                                                  "reason": "needs a surrogate"}}}
    lines = report.render_evaluation(result, "my model").splitlines()
    assert lines[0] == "# my model"
    assert lines[2] == "**Verdict: masking shown: attack zeroth_order beat attack pgd by 30.0 points**"
    assert "| gradient_agreement | 0.050 | 0.200 | flag |" in lines
    # an earlier eval.json's "transfer_failure" is shown under its current name
    assert "| baseline_transfer | – | – | n/a (needs a surrogate) |" in lines
    assert "| 8 | 0.200 | pgd, zeroth_order |" in lines
    assert "| zeroth_order | 8 | 0.200 | 30.0 |" in lines


def test_a_provisional_verdict_is_counted_as_such_in_the_reproduce_headline():
    from topkconv.reproduce.measures import masking_verdicts

    provisional = _eval("full", 0.8, {"pgd": (0.3, 8.0)}, 8.0, 0.2)
    provisional["verdict"].update(provisional=True, reason="attacks below their reference budget: square 6%")
    seeds = [{"paper": provisional, "strong": {"8": provisional}}]
    assert masking_verdicts(seeds) == "eps=8: no masking indicated (provisional) (1/1 seeds)"


def test_the_binarization_pass_rate_is_pooled_over_seeds_for_the_table_headline():
    from topkconv.reproduce import measures

    def seed(passes, fails, verdict):
        test = {"passes": passes, "fails": fails, "verdict": verdict, "pass_rate": passes / (passes + fails)}
        strong = {"suite": "full", "worst_case": {"eps": 8.0}, "indicators": {"binarization": test}}
        return {"paper": {}, "strong": {"8": strong}}

    assert measures.binarization_summary([seed(20, 0, "pass"), seed(17, 3, "fail")]) == \
        "eps=8: 37/40 examples pass (1/2 seeds pass)"
    assert measures.binarization_summary([{"paper": {}, "strong": {"8": {"suite": "full", "indicators": {}}}}]) == ""
