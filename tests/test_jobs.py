"""``--jobs``: worker processes give the same reports as one process, and a killed worker's run is redone."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from topkconv.reproduce import reproduce
from topkconv.reproduce.jobs import check_jobs, run_jobs
from topkconv.reproduce.workspace import Job

# A tiny Table III: three columns (one with TopKConv's CPU kernels), two seeds, the strong suite with transfer.
TINY_TABLE = """
table = "table3"
preset = "quick"
title = "tiny"
seeds = 2
surrogate = "Baseline"
strong_eps = [24.0]
[base.data]
name = "digits"
image_size = 16
augment = true
limit_train = 48
limit_test = 16
[base.model]
arch = "vgg-small"
width = 0.125
hidden = 16
[base.train]
epochs = {epochs}
batch_size = 24
warmup_epochs = 0
[base.attack]
suite = "full"
extra_eps = [24.0]
pgd_steps = 2
n_examples = 6
apgd_iters = 2
square_queries = 5
autoattack_attacks = ["apgd-ce"]
eps_curve = [0, 64]
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
[[columns]]
label = "TKC-max"
[columns.spec.model.defense]
kind = "topk_conv"
fc_k = [0.25, 0.5]
conv_k = 0.5
"""


def _spec(tmp_path, epochs=1) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TABLE.replace("{epochs}", str(epochs)), encoding="utf-8")
    return path


def _reports(out: Path) -> dict:
    reports = out / "reports"
    return {name: (reports / name).read_bytes()
            for name in ("table3.md", "table3.csv", "table3.json", "claims.md", "claims.json")}


@pytest.mark.slow
def test_two_workers_write_the_same_reports_as_one(tmp_path):
    spec = _spec(tmp_path)
    one = reproduce("table3", spec_file=spec, out=tmp_path / "one", jobs=1, progress=False)
    two = reproduce("table3", spec_file=spec, out=tmp_path / "two", jobs=2, progress=False)
    assert two["log"]["workers"] == 2 and len(two["log"]["jobs"]) == len(one["log"]["jobs"]) > 6
    first, second = _reports(tmp_path / "one"), _reports(tmp_path / "two")
    for name in first:
        assert first[name] == second[name], name
    assert b"Baseline" in first["table3.csv"] and b"T3-tkc-max-beats-dk-pgd" in first["claims.json"]
    runs = {p.name for p in (tmp_path / "one" / "runs").iterdir()}
    assert runs == {p.name for p in (tmp_path / "two" / "runs").iterdir()} and len(runs) == 6  # 3 columns x 2 seeds


@pytest.mark.slow
def test_a_killed_worker_leaves_its_run_to_be_redone_on_the_next_call(tmp_path):
    import multiprocessing

    spec = _spec(tmp_path, epochs=40)  # long enough to be caught mid-training
    runs = tmp_path / "out" / "runs"
    killed: list = []

    def kill_when_training():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if any((d / "train_state.json").is_file() and not (d / "run.json").is_file()
                   for d in (runs.iterdir() if runs.is_dir() else [])):
                # only reproduce's spawned job workers: a DataLoader worker left by an earlier test is a
                # (forked) child too, and torch raises in this process when one of those dies
                for child in multiprocessing.active_children():
                    if isinstance(child, multiprocessing.context.SpawnProcess):
                        os.kill(child.pid, signal.SIGKILL)
                        killed.append(child.pid)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_when_training)
    watcher.start()
    with pytest.raises(RuntimeError, match="died"):
        reproduce("table3", spec_file=spec, out=tmp_path / "out", jobs=2, seeds=1, progress=False)
    watcher.join()
    assert killed
    unfinished = [d for d in runs.iterdir() if not (d / "run.json").is_file()]
    assert unfinished  # what the killed worker was training does not count as a run

    done = reproduce("table3", spec_file=spec, out=tmp_path / "out", jobs=2, seeds=1, progress=False)
    trained = {job["key"] for job in done["log"]["jobs"] if job["step"] == "train"}
    assert {d.name for d in unfinished} <= trained
    assert all((d / "run.json").is_file() for d in runs.iterdir())
    assert (tmp_path / "out" / "reports" / "table3.md").is_file()


def test_jobs_run_after_what_they_need_and_report_one_line_each(monkeypatch):
    from topkconv.reproduce import jobs as jobs_module

    order = []
    monkeypatch.setattr(jobs_module, "execute", lambda job: order.append(job.key) or {"key": job.key,
                                                                                      "step": job.step, "seconds": 0.0})
    lines = []
    plan = [Job("train", "a", "train a", {}, "a"), Job("evaluate", "a/eval.json", "attack a", {}, "a", needs=("a",))]
    run_jobs(plan, 1, say=lines.append)
    assert order == ["a", "a/eval.json"] and lines == ["[1/2] train a (0.0 s)", "[2/2] attack a (0.0 s)"]
    with pytest.raises(ValueError, match="not planned"):
        run_jobs([Job("evaluate", "b/eval.json", "attack b", {}, "b", needs=("b",))], 1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="--jobs"):
            check_jobs(bad)


def test_workers_are_capped_at_the_cpus_and_the_free_memory_in_one_line(monkeypatch):
    from topkconv.reproduce import jobs as jobs_module

    monkeypatch.setattr(jobs_module, "usable_cpus", lambda: 4)
    monkeypatch.setattr(jobs_module, "available_memory", lambda: 64 * jobs_module.WORKER_MEMORY)
    said = []
    assert jobs_module.cap_workers(3, said.append) == 3 and said == []
    assert jobs_module.cap_workers(1000, said.append) == 4
    assert said == ["--jobs 1000: capped at 4, the number of CPUs"]
    monkeypatch.setattr(jobs_module, "available_memory", lambda: int(2.5 * jobs_module.WORKER_MEMORY))
    said.clear()
    assert jobs_module.cap_workers(3, said.append) == 2
    assert len(said) == 1 and said[0].startswith("--jobs 3: capped at 2:") and "memory" in said[0]
    monkeypatch.setattr(jobs_module, "available_memory", lambda: 0)
    assert jobs_module.cap_workers(2, said.append) == 1  # always at least one
