"""`topkconv reproduce`: the experiment specs, every report and figure, the cache, and spec errors."""

import json
from pathlib import Path

import pytest
import torch

from topkconv import reproduce as R
from topkconv.cli import main
from topkconv.models import build_model

EXPERIMENTS = Path(__file__).resolve().parents[1] / "src" / "topkconv" / "experiments"

# Merged into every column of the real quick specs: the same tables, shrunk to seconds.
TINY = {"data": {"limit_train": 48, "limit_test": 20, "image_size": 16},
        "model": {"width": 0.125, "hidden": 16},
        "train": {"epochs": 1, "batch_size": 24, "warmup_epochs": 0},
        "attack": {"pgd_steps": 2, "n_examples": 6, "apgd_iters": 2, "square_queries": 5,
                   "autoattack_attacks": ["apgd-ce"], "eps_curve": [0, 64], "eot_samples": 2, "batch_size": 64,
                   "zo_steps": 2, "zo_samples": [[0, 4]], "indicator_examples": 4, "indicator_draws": 4,
                   "indicator_steps": 3}}


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("table*.toml")), ids=lambda p: p.name)
def test_every_experiment_spec_parses_and_builds(path):
    from topkconv.data import load_data
    from topkconv.train import resolve_spec

    table = R.load_table_spec(path)
    # <table>-<preset>.toml, or <table>-verdict.toml: a quick table with more seeds (tests/test_claims.py)
    assert path.name in (f"{table.table}-{table.preset}.toml", f"{table.table}-verdict.toml")
    for column in table.columns:
        if column.not_reproduced is None:
            spec = table.run_spec(column.label)
            if table.preset == "quick":  # VGG16 at 224 px is too big to build in a unit test
                build_model(resolve_spec(spec, load_data(spec.data)).model)  # k values fit the layers


def test_paper_preset_follows_the_paper():
    table = R.load_table_spec(EXPERIMENTS / "table3-paper.toml")
    base = table.run_spec("Baseline")
    assert (base.data.name, base.data.image_size, base.model.arch) == ("cinic10", 224, "vgg16")
    pgd = base.attack.budget("pgd")
    assert (base.attack.eps, pgd.steps, pgd.step_size) == (8.0, 16, 0.75)
    assert table.run_spec("Dynamic-k").model.defense.fc_k == [250, 10]
    tkc = table.run_spec("TKC-max").model.defense
    assert (tkc.conv_layers, tkc.conv_k, tkc.criterion) == (2, 0.1, "max")
    table1 = R.load_table_spec(EXPERIMENTS / "table1-paper.toml")
    assert table1.column("Pruning + LogitAug").not_reproduced
    assert table1.run_spec("SAP").model.defense.sap_frac == 0.8


def test_quick_preset_reports_a_larger_eps():
    table = R.load_table_spec(EXPERIMENTS / "table3-quick.toml")
    spec = table.run_spec("Baseline")
    assert spec.attack.eps == 8.0 and spec.attack.extra_eps and max(spec.attack.extra_eps) > 8.0


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


GOOD = """
table = "table3"
preset = "quick"
[base.model]
arch = "vgg-small"
[[columns]]
label = "Baseline"
"""


@pytest.mark.parametrize("text, key", [
    (GOOD.replace('arch = "vgg-small"', 'arch = "vgg-small"\nwidht = 0.5'), "model.widht"),
    (GOOD + '[columns.spec.model.defense]\nkind = "dynamic_k"\nfc_kk = [1, 2]\n', "model.defense.fc_kk"),
    (GOOD + "bogus = 1\n", "columns[0].bogus"),
    (GOOD.replace('preset = "quick"', 'preset = "quick"\ncolums = []'), "colums"),
    (GOOD.replace('table = "table3"', 'table = "table9"'), "table"),
    (GOOD + '[columns.spec.train]\nepochs = "ten"\n', "train.epochs"),
    (GOOD + '[figures]\nfeature_max = "Nope"\n', "figures"),
])
def test_malformed_spec_names_the_key(tmp_path, text, key):
    path = _write(tmp_path / "bad.toml", text)
    with pytest.raises(ValueError) as err:
        R.load_table_spec(path)
    assert key in str(err.value) and "bad.toml" in str(err.value)


def test_strong_attack_changes_the_strong_suite_only(tmp_path):
    """A table's [strong_attack] reaches the strong evaluations and not the paper's FGSM and PGD: a larger EOT
    budget the paper suite's many images could not afford. Without it, the strong config is the column's own."""
    text = GOOD.replace('preset = "quick"', 'preset = "quick"\nstrong_eps = [8.0]') + \
        '[base.attack]\nsuite = "full"\n[base.attack.eot_pgd]\nsamples = 4\n'
    plain = R.load_table_spec(_write(tmp_path / "plain.toml", text))
    raised = R.load_table_spec(_write(tmp_path / "raised.toml", text + "[strong_attack.eot_pgd]\nsteps = 100\n"))
    raised, plain = R.Study(raised), R.Study(plain)
    configs = raised.attack_configs(raised.run_spec("Baseline"), "Baseline")
    before = plain.attack_configs(plain.run_spec("Baseline"), "Baseline")
    assert configs["strong@8"].budget("eot_pgd").steps == 100 and configs["strong@8"].budget("eot_pgd").samples == 4
    assert configs["paper"].budget("eot_pgd").steps is None and configs["paper"] == before["paper"]
    assert before["strong@8"].budget("eot_pgd").steps is None
    curve_text = text + "[strong_attack]\neps_curve = [0, 64]\n"
    curved = R.Study(R.load_table_spec(_write(tmp_path / "curve.toml", curve_text)))
    assert curved.attack_configs(curved.run_spec("Baseline"), "Baseline")["strong@8"].eps_curve == [0, 64]
    with pytest.raises(ValueError) as err:
        R.load_table_spec(_write(tmp_path / "bad.toml", text + "[strong_attack.eot_pgd]\nstepz = 100\n"))
    assert "strong_attack" in str(err.value) and "stepz" in str(err.value) and "bad.toml" in str(err.value)


def test_a_columns_strong_attack_changes_that_column_only(tmp_path):
    """A column's [columns.strong_attack] reaches that column's strong suite, over the table's, and leaves the
    other columns' configs (so their cache keys) as they were: the stochastic column alone gets a larger EOT."""
    text = GOOD.replace('preset = "quick"', 'preset = "quick"\nstrong_eps = [8.0]') + \
        '[[columns]]\nlabel = "SAP"\n[columns.strong_attack.eot_pgd]\nsteps = 100\n' + \
        '[base.attack]\nsuite = "full"\n[base.attack.eot_pgd]\nsamples = 4\n'
    plain = R.Study(R.load_table_spec(_write(tmp_path / "plain.toml", text.replace("steps = 100", ""))))
    study = R.Study(R.load_table_spec(_write(tmp_path / "column.toml", text)))
    raised = study.attack_configs(study.run_spec("SAP"), "SAP")
    assert raised["strong@8"].budget("eot_pgd").steps == 100 and raised["strong@8"].budget("eot_pgd").samples == 4
    assert raised["paper"] == plain.attack_configs(plain.run_spec("SAP"), "SAP")["paper"]
    baseline = study.attack_configs(study.run_spec("Baseline"), "Baseline")
    assert baseline == plain.attack_configs(plain.run_spec("Baseline"), "Baseline")
    both = R.Study(R.load_table_spec(_write(tmp_path / "both.toml", text + "[strong_attack.eot_pgd]\nsteps = 7\n")))
    for label, steps in [("SAP", 100), ("Baseline", 7)]:   # the column's over the table's
        assert both.attack_configs(both.run_spec(label), label)["strong@8"].budget("eot_pgd").steps == steps
    with pytest.raises(ValueError) as err:
        R.load_table_spec(_write(tmp_path / "bad.toml", text.replace("steps = 100", "stepz = 100")))
    assert "strong_attack" in str(err.value) and "stepz" in str(err.value) and "bad.toml" in str(err.value)


def test_malformed_spec_on_the_command_line(tmp_path, capsys):
    path = _write(tmp_path / "bad.toml", GOOD.replace('arch = "vgg-small"', 'arch = "vgg-small"\nwidht = 0.5'))
    assert main(["reproduce", "--spec", str(path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model.widht" in err and "bad.toml" in err
    assert main(["reproduce", "--spec", str(tmp_path / "missing.toml"), "--out", str(tmp_path)]) == 2
    assert "missing.toml" in capsys.readouterr().err


def test_merge_is_deep_and_leaves_inputs_alone():
    base = {"model": {"arch": "vgg-small", "defense": {"kind": "standard", "fc_k": [1, 2]}}}
    merged = R.merge(base, {"model": {"defense": {"kind": "dynamic_k"}}})
    assert merged["model"] == {"arch": "vgg-small", "defense": {"kind": "dynamic_k", "fc_k": [1, 2]}}
    assert base["model"]["defense"]["kind"] == "standard"


@pytest.mark.slow
def test_reproduce_all_writes_every_report_and_figure_then_hits_the_cache(tmp_path, capsys):
    done = R.reproduce("all", "quick", out=tmp_path, overrides=TINY, progress=False, seeds=1, jobs=1)
    reports = tmp_path / "reports"
    for name in ("table1", "table2", "table3"):
        for suffix in (".md", ".csv", ".json"):
            assert (reports / f"{name}{suffix}").is_file(), name + suffix
        assert (reports / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("figure3.png", "figure4.png", "routing.png", "routing.md", "routing.json", "claims.md",
                 "claims.json"):
        assert (reports / name).stat().st_size > 0, name

    table3 = (reports / "table3.md").read_text()
    for needle in ("| Attack | Baseline ours | Baseline paper |", "TKC-sum paper", "| PGD |", "0.421",
                   "Strong-suite worst case (eps=24)", "**Masking verdicts**", "; flagged: ", "**preset**", "**seeds**",
                   "**intervals**", "**hardware**", "**data**", "with 1 seed the seed-to-seed"):
        assert needle in table3, needle
    table1 = (reports / "table1.md").read_text()
    assert "not reproduced" in table1 and "undefined in the paper" in table1
    table2 = (reports / "table2.csv").read_text().splitlines()
    assert table2[0].startswith("table,row,measure,column,mean,lo,hi,paper,n,seed 0")
    assert any(",pgd@8,Pruning / All layers," in line and ",0.198," in line for line in table2)
    console = capsys.readouterr().out
    assert "TKC-max (ours / paper)" in console and "PGD" in console
    last = console.strip().splitlines()[-1]
    assert last.startswith("T3-"), last  # Table III's claims are the last lines printed

    claims = json.loads((reports / "claims.json").read_text())["claims"]
    assert {c["table"] for c in claims} == {"table1", "table2", "table3"}
    assert all(c["verdict_holm"] in ("reproduced", "contradicted", "no gain shown", "inconclusive", "not measured")
               for c in claims)
    routing = json.loads((reports / "routing.json").read_text())
    assert set(routing) == {"Dynamic-k", "TKC-neuron", "TKC-max", "TKC-sum"}

    trained = {job["key"] for job in done["log"]["jobs"] if job["step"] in ("train", "prune")}
    assert len(trained) >= 8  # shared columns (Baseline, Dynamic-k) train once across the tables
    files = sorted((tmp_path / "runs").glob("*/*.json")) + sorted((tmp_path / "runs").glob("*/*.safetensors"))
    stamps = {path: path.stat().st_mtime_ns for path in files}
    again = R.reproduce("table3", "quick", out=tmp_path, overrides=TINY, progress=False, seeds=1, jobs=1)
    assert again["log"]["jobs"] == [] and again["log"]["cached"]  # nothing trained or attacked again
    assert {path: path.stat().st_mtime_ns for path in files} == stamps


@pytest.mark.slow
def test_a_reported_number_is_the_one_in_its_eval_json(tmp_path):
    """Each seed's value in table3.json/.csv is its run's eval.json accuracy, and the cell is their mean."""
    done = R.reproduce("table3", "quick", out=tmp_path, overrides=TINY, progress=False, seeds=2, jobs=1)
    report = json.loads((tmp_path / "reports" / "table3.json").read_text())
    for label in ("Baseline", "TKC-max"):
        evals = [json.loads((tmp_path / "runs" / run / "eval.json").read_text()) for run in report["runs"][label]]
        assert len(evals) == 2 and evals[0]["run"]["seed"] != evals[1]["run"]["seed"]
        for measure, read in (("clean", lambda e: e["clean"]), ("pgd@8", lambda e: e["attacks"]["pgd"]["accuracy"]),
                              ("pgd@24", lambda e: e["attacks"]["pgd@24"]["accuracy"])):
            cell = report["cells"][label][measure]
            assert cell["per_seed"] == pytest.approx([read(e) for e in evals]), (label, measure)
            assert cell["mean"] == pytest.approx(sum(read(e) for e in evals) / 2)
            assert cell["lo"] <= cell["mean"] <= cell["hi"]
        strong = [json.loads((tmp_path / "runs" / run / "eval-strong-24.json").read_text())
                  for run in report["runs"][label]]
        assert report["cells"][label]["worst@24"]["per_seed"] == pytest.approx(
            [s["worst_case"]["accuracy"] for s in strong])
    csv_line = next(line for line in (tmp_path / "reports" / "table3.csv").read_text().splitlines()
                    if ",pgd@8,Baseline," in line)
    cell = report["cells"]["Baseline"]["pgd@8"]
    assert csv_line.split(",")[4] == str(round(cell["mean"], 6))
    assert done["table3"]["summary"]["cells"]["Baseline"]["pgd@8"] == cell


def test_seeds_are_their_own_runs_with_a_fixed_data_split():
    study = R.Study(R.load_table_spec(EXPERIMENTS / "table3-quick.toml"), seeds=3)
    specs = [study.run_spec("TKC-max", seed) for seed in range(3)]
    assert [s.train.seed for s in specs] == [0, 1, 2]
    assert len({s.hash() for s in specs}) == 3 and len({s.data.split_seed for s in specs}) == 1
    assert R.Study(study.table).seeds == study.table.seeds == 3
    with pytest.raises(ValueError, match="--seeds"):
        R.Study(study.table, seeds=0)


@pytest.mark.slow
def test_sweep_over_any_key_reports_intervals_and_checks_values_first(tmp_path):
    out = R.sweep("model.width", ["0.125", 0.25], columns=["Baseline", "Dynamic-k"], out=tmp_path,
                  overrides=dict(TINY, attack=dict(TINY["attack"], suite="paper")), progress=False, seeds=2, jobs=1)
    reports = tmp_path / "reports"
    assert (reports / "sweep-model.width.png").read_bytes()[:4] == b"\x89PNG"
    lines = (reports / "sweep-model.width.csv").read_text().splitlines()
    assert lines[0] == "key,value,column,measure,mean,lo,hi,n,seed 0,seed 1"
    assert [p["value"] for p in out["points"]] == [0.125, 0.25]
    runs = {run for p in out["points"] for label_runs in p["runs"].values() for run in label_runs}
    assert len(runs) == 2 * 2 * 2  # every (value, column, seed) is its own run
    assert "T1" not in (reports / "sweep-model.width.md").read_text()
    with pytest.raises(ValueError, match="model.widht"):
        R.sweep("model.widht", [0.5], out=tmp_path / "bad", overrides=TINY, seeds=1, jobs=1)
    with pytest.raises(ValueError, match="conv_k=2.5"):
        R.sweep("model.defense.conv_k", [0.5, 2.5], columns=["TKC-max"], out=tmp_path / "bad", overrides=TINY,
                seeds=1, jobs=1)
    assert not (tmp_path / "bad" / "runs").exists()  # checked before the first training


def test_routing_selections_are_the_layers_own():
    """Summing what selection_mask says each layer selected gives back the layer's output."""
    from topkconv import functional as TF
    from topkconv.figures import selection_mask
    from topkconv.layers import TopKConv2d, TopKLinear, TopKNeuronConv2d

    torch.manual_seed(0)
    linear = TopKLinear(12, 5, k=3)
    x = torch.randn(4, 12)
    mask = selection_mask(linear, x)
    assert mask.shape == (4, 5, 12) and (mask.sum(-1) == 3).all()
    products = x.unsqueeze(1) * linear.weight.unsqueeze(0)
    torch.testing.assert_close((products * mask).sum(-1) + linear.bias, linear(x))

    conv = TopKConv2d(6, 4, 3, k=2, criterion="max", padding=1)
    x = torch.randn(3, 6, 5, 5)
    mask = selection_mask(conv, x)
    assert mask.shape == (3, 4, 6) and (mask.sum(-1) == 2).all()
    maps = TF.channel_maps(x, conv.weight, conv.stride, conv.padding, conv.dilation)
    torch.testing.assert_close((maps * mask[..., None, None]).sum(2) + conv.bias.view(1, -1, 1, 1), conv(x))

    neuron = TopKNeuronConv2d(6, 8, 3, k=3, padding=1)
    mask = selection_mask(neuron, x)
    assert mask.shape == (3, 1, 8) and (mask.sum(-1) == 3).all()
    out = neuron(x)
    assert (out.abs().amax(dim=(-2, -1)) > 0).le(mask[:, 0]).all()  # unselected channels are zero


def test_routing_statistics_count_and_overlap():
    """Two classes routed through disjoint inputs have Jaccard 0; identical routes have Jaccard 1."""
    from topkconv.figures import LayerRoutes, summarize_routes

    counts = torch.zeros(2, 1, 4, dtype=torch.int32)
    counts[0, 0, :2] = 5   # class 0 always uses inputs 0 and 1
    counts[1, 0, 2:] = 5   # class 1 always uses inputs 2 and 3
    s = summarize_routes(LayerRoutes("fc", "dynamic_k", 2, counts, torch.tensor([5, 5])))
    assert s["jaccard_core_mean"] == 0.0 and s["jaccard_any_mean"] == 0.0
    assert s["distinct_per_output_mean"] == 4 and s["distinct_per_output_per_class"] == {0: 2.0, 1: 2.0}
    counts[1] = counts[0]
    s = summarize_routes(LayerRoutes("fc", "dynamic_k", 2, counts, torch.tensor([5, 5])))
    assert s["jaccard_core_mean"] == 1.0 and s["inputs_never_used"] == 2


def test_sweep_on_the_command_line_names_a_bad_key_or_missing_values(tmp_path, capsys):
    assert main(["sweep", "model.widht", "0.5", "--out", str(tmp_path), "--seeds", "1"]) == 2
    assert "model.widht" in capsys.readouterr().err
    assert main(["sweep", "model.width", "--out", str(tmp_path)]) == 2
    assert "at least one VALUE" in capsys.readouterr().err
    assert main(["reproduce", "--jobs", "0", "--out", str(tmp_path)]) == 2
    assert "--jobs" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# The shipped AT table shrunk to seconds: (old, new) text replacements, each of which must hit.
AT_TINY = (("seeds = 3", "seeds = 1"), ("eval_examples = 200", "eval_examples = 12"),
           ("strong_eps = [8.0, 24.0]", "strong_eps = [24.0]"),  # the AT claims' deciding radius only
           ("[base.data]\n", "[base.data]\nlimit_train = 48\nlimit_test = 12\n"),
           ("image_size = 32", "image_size = 16"),
           ("hidden = 128", "hidden = 16"), ("width = 0.25", "width = 0.125"), ("epochs = 10", "epochs = 1"),
           ("warmup_epochs = 2", "warmup_epochs = 0"), ("n_examples = 100", "n_examples = 6"),
           ("steps = 16", "steps = 2"), ("iterations = 20", "iterations = 2"),
           ('attacks = ["apgd-ce", "apgd-dlr"]', 'attacks = ["apgd-ce"]'), ("queries = 300", "queries = 5"),
           ("steps = 10\n", "steps = 2\n"), ("samples = [[0, 20]]", "samples = [[0, 4]]"),
           ("examples = 20", "examples = 4"), ("examples = 24", "examples = 4"), ("draws = 10", "draws = 4"),
           ("steps = 40", "steps = 3"), ("eps_curve = [0, 128]", "eps_curve = [0, 64]"))


def _tiny_at_spec(tmp_path) -> Path:
    """A copy of the shipped AT table with :data:`AT_TINY`: 1 seed, 1 epoch, 48 training digits at 16 px, the
    strong suite at 24/255 on 6 examples. A change to the shipped spec that a replacement misses fails here."""
    text = (EXPERIMENTS / "tableat-quick.toml").read_text(encoding="utf-8")
    for old, new in AT_TINY:
        assert old in text, old
        text = text.replace(old, new)
    text = text.replace("check_examples = 100", "check_examples = 4")
    return _write(tmp_path / "tableat-tiny.toml", text)


def test_reproduce_tableat_writes_its_table_without_paper_numbers_and_judges_its_questions(tmp_path, capsys):
    """`topkconv reproduce tableat --spec <tiny copy>`: reports/tableat.md with "–" for every paper cell, and
    claims.md/.json holding only the project's AT questions, each judged on its deciding measure."""
    spec = _tiny_at_spec(tmp_path)
    out = tmp_path / "out"
    assert main(["reproduce", "tableat", "--spec", str(spec), "--out", str(out), "--jobs", "1", "--no-progress"]) == 0
    reports = out / "reports"
    table = (reports / "tableat.md").read_text()
    assert "| Attack | Baseline ours | Baseline paper | Baseline + AT ours | Baseline + AT paper |" in table
    assert "none: the paper has no such table" in table and "CINIC-10" not in table
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith(("| None |", "| Strong-suite worst case (eps=24) |"))]
    assert len(rows) == 2 and all(row[2::2] == ["–"] * 4 for row in rows), rows  # every paper cell is "–"
    assert (reports / "tableat.csv").is_file() and (reports / "tableat.json").is_file()
    claims = json.loads((reports / "claims.json").read_text())["claims"]
    assert {c["table"] for c in claims} == {"tableat"} and {c["source"] for c in claims} == {"project"}
    assert len(claims) == 6 and all(c["paper_difference"] is None for c in claims)
    verdicts = {c["id"]: (c["decision"] or {}).get("measure") for c in claims}
    assert all(measure in ("clean", "worst@24") for measure in verdicts.values()), verdicts  # all measured
    assert all(c["verdict_holm"] in ("reproduced", "contradicted", "no gain shown", "inconclusive") for c in claims)
    text = (reports / "claims.md").read_text()
    assert text.startswith("# The project's own questions, tested") and "The paper's claims" not in text
    assert "The project's own questions" in capsys.readouterr().out
    with pytest.raises(ValueError, match="'tableat'"):  # the spec is for tableat, not table3
        R.reproduce("table3", "quick", spec_file=spec, out=tmp_path / "other", progress=False, jobs=1)


def test_the_cli_targets_are_the_spec_tables_and_all_is_the_papers():
    from topkconv.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    target = next(a for a in commands["reproduce"]._actions if a.dest == "target")
    table = next(a for a in commands["sweep"]._actions if a.dest == "table")
    assert tuple(target.choices) == R.TARGETS and tuple(table.choices) == R.TABLES
    assert "tableat" in R.TABLES and "tableat" not in R.PAPER_TABLES
    assert R.spec_path("tableat", "quick").is_file()
