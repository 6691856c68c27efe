"""Report tables: the paper's published numbers beside ours, in Markdown, CSV and console text."""

import csv
import io

import pytest

from topkconv import report


def _eval(suite, clean, attacks, eps=8.0, worst=None, flags=()):
    """An eval dict shaped as topkconv.evaluate.evaluate returns it."""
    checks = {"iterative_beats_single_step": {"verdict": "pass"}, "chance_at_large_eps": {"verdict": "n/a"}}
    checks.update({name: {"verdict": "flag"} for name in flags})
    text = f"masking suspected (indicators {', '.join(flags)})" if flags else "no masking indicated"
    return {"suite": suite, "clean": clean, "verdict": {"text": text}, "indicators": checks,
            "attacks": {name: {"accuracy": acc, "params": {"eps": e}, "n": 10, "seconds": 0.1}
                        for name, (acc, e) in attacks.items()},
            "worst_case": {"accuracy": worst if worst is not None else 0.0, "eps": eps, "n": 10},
            "masking_checks": checks}


def _column(clean, fgsm, pgd, fgsm48, pgd48, worst8, worst48, flags=()):
    paper = _eval("paper", clean, {"fgsm": (fgsm, 8.0), "pgd": (pgd, 8.0), "fgsm@48": (fgsm48, 48.0),
                                   "pgd@48": (pgd48, 48.0)})
    strong8 = _eval("full", clean, {"fgsm": (fgsm, 8.0), "pgd": (pgd, 8.0)}, 8.0, worst8)
    strong48 = _eval("full", clean, {"fgsm": (fgsm48, 48.0), "pgd": (pgd48, 48.0)}, 48.0, worst48, flags)
    return {"paper": paper, "strong": {"8": strong8, "48": strong48}}


LABELS = ["Baseline", "Dynamic-k", "TKC-neuron", "TKC-max", "TKC-sum"]


def _table3():
    results = {label: _column(0.9 + i / 100, 0.8 - i / 100, 0.7, 0.3, 0.1 + i / 10, 0.65, 0.05 + i / 100,
                              flags=("bpda_not_stronger",) if label == "TKC-max" else ())
               for i, label in enumerate(LABELS)}
    return report.attack_table("table3", "Table III", LABELS, results, [8.0, 48.0], notes=["a note"],
                               strong_eps=[8.0, 48.0])


def test_table3_rows_columns_and_paper_numbers():
    table = _table3()
    assert [row[0] for row in table.rows[:5]] == ["None", "FGSM", "PGD", "FGSM (eps=48)", "PGD (eps=48)"]
    assert table.header[1:3] == ["Baseline ours", "Baseline paper"]
    assert table.header[-2:] == ["TKC-sum ours", "TKC-sum paper"]
    by_row = {row[0]: row for row in table.rows}
    col = {name: i for i, name in enumerate(table.header)}
    # the paper's published constants, in the "paper" columns
    assert by_row["PGD"][col["TKC-max paper"]] == 0.421
    assert by_row["None"][col["Dynamic-k paper"]] == 0.921
    assert by_row["FGSM"][col["Baseline paper"]] == 0.192
    # the paper has no numbers at our larger eps
    assert by_row["PGD (eps=48)"][col["Baseline paper"]] is None
    # ours come from the eval dicts
    assert by_row["None"][col["TKC-neuron ours"]] == pytest.approx(0.92)
    assert by_row["PGD (eps=48)"][col["TKC-max ours"]] == pytest.approx(0.4)
    assert by_row["Strong-suite worst case (eps=48)"][col["Dynamic-k ours"]] == pytest.approx(0.06)
    assert by_row["Strong-suite worst case (eps=8)"][col["Baseline ours"]] == pytest.approx(0.65)
    assert by_row["Gradient-masking flags"][col["TKC-max ours"]] == "bpda_not_stronger@48"
    assert by_row["Gradient-masking flags"][col["Baseline ours"]] == "none"


def test_markdown_csv_and_console_agree():
    table = _table3()
    meta = {"preset": "quick", "data": "digits", "seeds": "train 0", "hardware": "cpu"}
    md = report.render_markdown(table, meta)
    assert "| Attack | Baseline ours | Baseline paper |" in md
    assert "**preset**: quick" in md and "**hardware**: cpu" in md and "paper columns" in md
    assert "0.421" in md and "a note" in md
    rows = list(csv.reader(io.StringIO(report.render_csv(table))))
    assert rows[0] == table.header
    pgd = next(r for r in rows if r[0] == "PGD")
    assert float(pgd[rows[0].index("TKC-max paper")]) == 0.421
    assert float(pgd[rows[0].index("Baseline ours")]) == pytest.approx(0.7)
    console = report.render_console(table)
    assert "TKC-max (ours / paper)" in console and "0.700 / 0.421" in console


def test_not_reproduced_column_and_missing_results():
    results = {"Baseline": _column(0.9, 0.5, 0.4, 0.2, 0.1, 0.4, 0.05)}
    table = report.attack_table("table1", "Table I", ["Baseline", "Pruning + LogitAug", "SAP"], results, [8.0],
                                not_reproduced={"Pruning + LogitAug": "undefined in the paper"})
    by_row = {row[0]: row for row in table.rows}
    col = {name: i for i, name in enumerate(table.header)}
    assert by_row["PGD"][col["Pruning + LogitAug ours"]] == "not reproduced"
    assert by_row["PGD"][col["Pruning + LogitAug paper"]] == 0.245
    assert by_row["PGD"][col["SAP paper"]] is None        # the paper printed a dash
    assert by_row["PGD"][col["SAP ours"]] is None         # not evaluated
    assert any("undefined in the paper" in note for note in table.notes)
    assert "–" in report.render_markdown(table, {})


def test_table2_in_percent_with_paper_numbers():
    results = {"Pruning / All layers": _column(0.9, 0.5, 0.25, 0.2, 0.1, 0.2, 0.05),
               "Dynamic-K / Final two layers": _column(0.95, 0.6, 0.5, 0.3, 0.2, 0.45, 0.1)}
    table = report.pruning_table("Table II", list(results), results, 8.0, eps_list=[8.0, 48.0],
                                 strong_eps=[8.0, 48.0])
    assert table.header[:5] == ["Method", "Layers Affected", "Adv Acc ours", "Adv Acc paper",
                                "Adv Acc ours (eps=48)"]
    col = {name: i for i, name in enumerate(table.header)}
    rows = {(r[0], r[1]): r for r in table.rows}
    assert rows[("Pruning", "All layers")][col["Adv Acc ours"]] == pytest.approx(25.0)
    assert rows[("Pruning", "All layers")][col["Adv Acc paper"]] == 19.8
    assert rows[("Pruning", "All layers")][col["Adv Acc ours (eps=48)"]] == pytest.approx(10.0)
    assert rows[("Dynamic-K", "Final two layers")][col["Adv Acc paper"]] == 31.1
    assert rows[("Dynamic-K", "Final two layers")][col["Worst case ours (eps=8)"]] == pytest.approx(45.0)
    assert rows[("Dynamic-K", "Final two layers")][col["Worst case ours (eps=48)"]] == pytest.approx(10.0)


def test_plain_eval_json_reads_as_both_suites():
    plain = _eval("full", 0.8, {"fgsm": (0.5, 8.0), "pgd": (0.3, 8.0)}, 8.0, 0.2, flags=("more_steps_same",))
    assert report.attack_accuracy(plain, "pgd", 8.0) == 0.3
    assert report.attack_accuracy(plain, "pgd", 16.0) is None
    assert report.worst_case(plain, 8.0) == 0.2
    assert report.masking_flags(plain) == ["more_steps_same@8"]


def test_write_table_writes_md_and_csv(tmp_path):
    paths = report.write_table(tmp_path / "reports", _table3(), {"preset": "quick"})
    assert (tmp_path / "reports" / "table3.md").read_text().startswith("# Table III")
    assert (tmp_path / "reports" / "table3.csv").read_text().startswith("Attack,Baseline ours")
    assert set(paths) == {"md", "csv"}


def test_each_models_masking_verdict_is_in_the_reports_first_lines():
    md = report.render_markdown(_table3(), {"preset": "quick"}).splitlines()
    top = md[:len(LABELS) + 5]
    assert "- TKC-max: eps=8: no masking indicated; eps=48: masking suspected (indicators bpda_not_stronger)" in top
    assert "- Baseline: eps=8: no masking indicated; eps=48: no masking indicated" in top
    console = report.render_console(_table3()).splitlines()
    assert console[1 + LABELS.index("TKC-max")].startswith("  masking: TKC-max: eps=8: no masking indicated")


def test_masking_flags_come_from_the_indicators():
    result = _eval("full", 0.8, {"pgd": (0.3, 8.0)}, 8.0, 0.2)
    result["indicators"]["selection_flip_rate"] = {"value": 0.4, "threshold": 0.1, "verdict": "flag"}
    assert report.masking_flags(result) == ["selection_flip_rate@8"]


def test_one_evaluation_as_markdown_starts_with_its_verdict():
    result = {"suite": "full", "n": 10, "clean": 0.9, "model": {"routing": True},
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
    assert "| transfer_failure | – | – | n/a (needs a surrogate) |" in lines
    assert "| 8 | 0.200 | pgd, zeroth_order |" in lines
    assert "| zeroth_order | 8 | 0.200 | 30.0 |" in lines
