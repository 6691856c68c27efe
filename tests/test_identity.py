"""The spec is the identity, and the cache is its content: an edited record, a retrain, a copied or touched
output folder, a corrupt cached file and a second writer are each caught, in one line, and redo only what
they must.

A tiny Table III (two columns, one seed, the strong suite with its transfer attack) is reproduced once for
the module; every test works on a copy of it.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from topkconv.checkpoint import MODEL_FILE, RUN_FILE
from topkconv.cli import main
from topkconv.reproduce import reproduce

TINY_TABLE = """
table = "table3"
preset = "quick"
title = "tiny"
seeds = 1
surrogate = "Baseline"
strong_eps = [24.0]
[base.data]
name = "digits"
image_size = 16
limit_train = 48
limit_test = 16
[base.model]
arch = "vgg-small"
width = 0.125
hidden = 16
[base.train]
epochs = 1
batch_size = 24
warmup_epochs = 0
[base.attack]
suite = "full"
pgd_steps = 2
n_examples = 4
apgd_iters = 2
square_queries = 5
autoattack_attacks = ["apgd-ce"]
eps_curve = []
eot_samples = 2
batch_size = 64
zo_steps = 2
zo_samples = [[0, 4]]
indicator_examples = 4
indicator_draws = 4
indicator_steps = 3
[[columns]]
label = "Baseline"
[[columns]]
label = "Dynamic-k"
[columns.spec.model.defense]
kind = "dynamic_k"
fc_k = [0.25, 0.5]
"""
TRAIN = ["--dataset", "digits", "--limit-train", "64", "--limit-test", "32", "--width", "0.125", "--image-size", "16",
         "--hidden", "16", "--batch-size", "32", "--epochs", "1", "--no-progress"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(spec file, a finished output folder) of the tiny table."""
    root = tmp_path_factory.mktemp("identity")
    spec = root / "tiny.toml"
    spec.write_text(TINY_TABLE, encoding="utf-8")
    done = reproduce("table3", spec_file=spec, out=root / "out", jobs=1, progress=False)
    assert {job["step"] for job in done["log"]["jobs"]} == {"train", "evaluate"}
    return spec, root / "out"


def files_of(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "reports" not in p.parts}


def again(spec, out, capsys, *extra):
    """``topkconv reproduce`` into ``out``; returns (exit status, stderr lines, the log it wrote)."""
    code = main(["reproduce", "--spec", str(spec), "--out", str(out), "--jobs", "1", *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    log = json.loads((out / "reports" / "reproduce-log.json").read_text()) if code == 0 else None
    return code, err, log


def copy_of(finished, tmp_path):
    spec, out = finished
    shutil.copytree(out, tmp_path / "out")
    return spec, tmp_path / "out"


def test_touched_weights_redo_nothing(finished, tmp_path, capsys):
    spec, out = copy_of(finished, tmp_path)
    before = files_of(out)
    for weights in out.rglob(MODEL_FILE):  # the Baseline's among them: every strong suite's surrogate
        os.utime(weights, (1, 1))
    code, err, log = again(spec, out, capsys)
    assert code == 0 and log["jobs"] == [] and not log["notes"], err
    assert files_of(out) == before


def test_a_copied_output_folder_redoes_nothing(finished, tmp_path, capsys):
    spec, out = finished
    subprocess.run(["cp", "-r", str(out), str(tmp_path / "copy")], check=True)  # new times, new inodes
    code, err, log = again(spec, tmp_path / "copy", capsys)
    assert code == 0 and log["jobs"] == [] and not log["notes"], err


@pytest.mark.parametrize("content", [b"[]", b"\x93\x01garbage\xff", b'{"clean": 0.5}'], ids=["list", "bytes", "shape"])
def test_a_corrupt_cached_evaluation_is_named_and_redone(content, finished, tmp_path, capsys):
    spec, out = copy_of(finished, tmp_path)
    broken = sorted(out.glob("runs/*/eval-strong-24.json"))[0]
    broken.write_bytes(content)
    code, err, log = again(spec, out, capsys)
    assert code == 0, err
    named = [line for line in err if str(broken) in line]
    assert len(named) == 1 and "redone" in named[0], err
    assert [job["key"] for job in log["jobs"]] == [f"{broken.parent.name}/{broken.name}"]
    assert json.loads(broken.read_text())["reproduce_key"]["model"]


def test_weights_that_do_not_load_mark_the_run_unfinished(finished, tmp_path, capsys):
    spec, out = copy_of(finished, tmp_path)
    weights = sorted(out.glob(f"runs/*/{MODEL_FILE}"))[0]
    weights.write_bytes(weights.read_bytes()[:200])  # truncated
    code, err, log = again(spec, out, capsys)
    assert code == 0, err
    named = [line for line in err if str(weights) in line]
    assert len(named) == 1 and "cannot be read" in named[0] and "trained again" in named[0], err
    assert {"key": weights.parent.name, "step": "train"}.items() <= log["jobs"][0].items()
    assert weights.stat().st_size > 200


def test_a_second_writer_of_an_output_folder_is_refused_naming_the_holder(finished, tmp_path, capsys):
    spec, out = copy_of(finished, tmp_path)
    before = files_of(out)
    holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom topkconv.checkpoint import run_lock\n"
                               "with run_lock(sys.argv[1]):\n    print('holding', flush=True)\n    sys.stdin.read()\n",
                               str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        for command in (["reproduce", "--spec", str(spec)], ["sweep", "model.width", "0.125", "0.25", "--spec",
                                                             str(spec), "--seeds", "1"]):
            code = main([*command, "--out", str(out), "--jobs", "1"])
            err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
            assert code == 2 and len(err) == 1, err
            assert f"pid {holder.pid}" in err[0] and str(out) in err[0]
    finally:
        holder.communicate("")
    assert files_of(out) == before


def test_jobs_beyond_the_cpus_are_capped_in_one_line(finished, tmp_path, capsys):
    spec, out = copy_of(finished, tmp_path)
    code, err, log = again(spec, out, capsys, "--jobs", "1000")
    cpus = len(os.sched_getaffinity(0))
    assert code == 0 and log["workers"] <= cpus
    assert sum("--jobs 1000: capped at" in line for line in err) >= 1
    assert f"--jobs 1000: capped at {cpus}, the number of CPUs" in err


def test_an_edited_run_json_is_refused_naming_the_file_and_both_hashes(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TRAIN, "--out", str(run)]) == 0
    record = json.loads((run / RUN_FILE).read_text())
    record["spec"]["model"]["defense"] = {"kind": "dropout"}  # resolved_hash left as it was
    (run / RUN_FILE).write_text(json.dumps(record))
    before = files_of(run)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--n", "4", "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and MODEL_FILE in err[0] and RUN_FILE in err[0], err
    assert record["resolved_hash"] in err[0]
    from topkconv.config import spec_from_dict

    assert spec_from_dict(record["spec"]).hash() in err[0]
    assert files_of(run) == before and not (run / "eval.json").exists()


def test_a_retrain_leaves_no_evaluation_of_the_old_weights(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TRAIN, "--out", str(run)]) == 0
    old = ["eval.json", "eval.md", "acc-vs-eps.png", "eval-strong-8.json", "eval-strong-8.md",
           "eval-strong-8-acc-vs-eps.png", "strength-curves.json", "strength-curves.png",
           "eval-strong-8-strength-curves.json"]
    for name in old:
        (run / name).write_text("of the old weights\n")
    (run / "notes.txt").write_text("mine\n")
    (run / ".train_state.json.k1ll3d.tmp").write_text("{ torn")  # a writer killed mid-write left it
    assert main(["train", *TRAIN, "--seed", "7", "--force", "--out", str(run)]) == 0
    assert not [name for name in old if (run / name).exists()] and not list(run.glob(".*.tmp"))
    assert (run / "notes.txt").read_text() == "mine\n" and (run / RUN_FILE).is_file()
    for name in old:  # an extension (--resume with more epochs) clears them too
        (run / name).write_text("of the old weights\n")
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert not [name for name in old if (run / name).exists()]


SWEEP_CASES = [
    ("epochs-0", ["train.epochs", "1", "0"], ["train.epochs", "positive"]),
    ("duplicate", ["model.width", "0.125", "0.125"], ["0.125", "twice"]),
    ("changes-nothing", ["name", "a", "b"], ["changes nothing", "'a'", "'b'"]),
]


@pytest.mark.parametrize("values, words", [c[1:] for c in SWEEP_CASES], ids=[c[0] for c in SWEEP_CASES])
def test_sweep_values_are_checked_before_the_first_job(values, words, tmp_path, capsys):
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_TABLE, encoding="utf-8")
    code = main(["sweep", *values, "--spec", str(spec), "--out", str(tmp_path / "out"), "--jobs", "1"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    for word in words:
        assert word in err[0], (word, err[0])
    assert not (tmp_path / "out").exists()  # no run folder, no lock: nothing started


@pytest.mark.slow
def test_two_reproduce_commands_into_one_folder_train_each_run_once(tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_TABLE.replace("epochs = 1", "epochs = 3"), encoding="utf-8")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "topkconv.cli", "reproduce", "--spec", str(spec), "--out", str(out), "--jobs", "1",
               "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = out / ".topkconv.lock"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.1)
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert f"pid {first.pid}" in lines[0] and str(out) in lines[0]
    finally:
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    for metrics in out.glob("runs/*/metrics.jsonl"):  # trained once: one line per epoch, no second training
        assert len(metrics.read_text().splitlines()) == 3, metrics
    third = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert json.loads((out / "reports" / "reproduce-log.json").read_text())["jobs"] == []


def test_the_surrogate_is_the_column_the_spec_names(tmp_path):
    from topkconv.reproduce import Study, Workspace, load_table_spec
    from topkconv.reproduce.sweep import _restricted

    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_TABLE, encoding="utf-8")
    study = Study(load_table_spec(spec))
    workspace = Workspace(tmp_path / "out")
    jobs, _ = workspace.plan([study])
    strong = {job.key.split("/")[1]: job.surrogate_dir for job in jobs if job.step == "evaluate"
              and "strong" in job.key and job.key.startswith(workspace.run_dir(study.run_spec("Dynamic-k")).name)}
    assert strong == {"eval-strong-24.json": str(workspace.run_dir(study.run_spec("Baseline")))}
    alone = _restricted(study, ["Dynamic-k"])  # a sweep of one column: no surrogate, and its own file name
    jobs, _ = workspace.plan([alone])
    strong = {job.key.split("/")[1]: job.surrogate_dir for job in jobs
              if job.step == "evaluate" and "strong" in job.key}
    assert strong == {"eval-strong-24-no-transfer.json": None}
    none = tmp_path / "none.toml"
    none.write_text(TINY_TABLE.replace('surrogate = "Baseline"\n', ""), encoding="utf-8")
    jobs, _ = workspace.plan([Study(load_table_spec(none))])
    assert all(job.surrogate_dir is None for job in jobs)  # no label is matched by its name
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY_TABLE.replace('surrogate = "Baseline"', 'surrogate = "Basline"'), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.toml: key 'surrogate' names 'Basline'"):
        load_table_spec(bad)


def test_the_older_sweep_k_form_is_gone(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "--k", "0.5", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "--k" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
