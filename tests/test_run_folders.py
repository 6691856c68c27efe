"""How run folders behave: one writer at a time, no finished run replaced unless asked (and then only after
the new run's first epoch), --resume to extend, --allow-unfinished. The lock and the replace rule are
checked with real processes."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from topkconv.checkpoint import (LOCK_FILE, METRICS_FILE, MODEL_FILE, RUN_FILE, STAGING_DIR, RunLockedError,
                                 run_lock)
from topkconv.cli import main

TINY = ["--dataset", "digits", "--limit-train", "64", "--limit-test", "32", "--width", "0.125", "--image-size", "16",
        "--hidden", "16", "--batch-size", "32", "--epochs", "1", "--no-progress"]
CLI = [sys.executable, "-m", "topkconv.cli"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def files_of(folder):
    """Every file under ``folder`` with its bytes (the lock excluded)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def assert_no_leftovers(folder):
    assert not list(folder.rglob(LOCK_FILE)), "a stray lock file"
    assert not list(folder.rglob(STAGING_DIR)), "a stray staging folder"
    assert not list(folder.rglob("*.tmp")), "a stray temporary file"


def finished_run(folder, *extra):
    assert main(["train", *TINY, *extra, "--out", str(folder)]) == 0
    (folder / "eval.json").write_text('{"of": "the old weights"}\n')
    (folder / "acc-vs-eps.png").write_bytes(b"old plot")
    (folder / "eval-full.json").write_text('{"of": "the old weights"}\n')
    return files_of(folder)


def wait_for(condition, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_run_lock_is_reentrant_in_a_thread_and_refuses_another_thread_and_process(tmp_path):
    folder = tmp_path / "run"
    probe = ("import sys\nfrom topkconv.checkpoint import RunLockedError, run_lock\ntry:\n"
             "    with run_lock(sys.argv[1]):\n        print('got it')\nexcept RunLockedError as err:\n    print(err)\n")
    with run_lock(folder):
        with run_lock(folder):  # nested in the same thread (reproduce around fit)
            pass
        assert (folder / LOCK_FILE).exists()
        errors = []
        worker = threading.Thread(target=lambda: errors.append(_try_lock(folder)))
        worker.start()
        worker.join()
        assert isinstance(errors[0], RunLockedError) and f"pid {os.getpid()}" in str(errors[0])
        other = subprocess.run([sys.executable, "-c", probe, str(folder)], env=ENV, capture_output=True, text=True,
                               timeout=300)
        assert f"{folder} is being written by another topkconv process (pid {os.getpid()})" in other.stdout, other
    assert_no_leftovers(tmp_path)
    with run_lock(folder):  # free again
        pass
    other = subprocess.run([sys.executable, "-c", probe, str(folder)], env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert other.stdout.strip() == "got it", other
    assert_no_leftovers(tmp_path)


def _try_lock(folder):
    try:
        with run_lock(folder):
            return None
    except RunLockedError as err:
        return err


def test_a_second_writer_is_refused_and_a_killed_writers_lock_is_taken_over(tmp_path):
    out = tmp_path / "shared"
    holder = subprocess.Popen([*CLI, "train", *TINY, "--epochs", "2000", "--out", str(out)], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = out / LOCK_FILE
        wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(holder.pid) or holder.poll() is not None,
                 what="the first process to take the lock")
        assert holder.poll() is None, holder.stderr.read()
        second = subprocess.run([*CLI, "train", *TINY, "--out", str(out)], env=ENV, capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and str(out) in lines[0], second.stderr
        wait_for(lambda: (out / METRICS_FILE).is_file(), what="the first epoch")  # so it leaves a partial run
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stderr.close()
    assert (out / LOCK_FILE).read_text().strip() == str(holder.pid)  # stale: its holder is dead
    assert not (out / RUN_FILE).exists()
    assert main(["train", *TINY, "--out", str(out)]) == 0  # takes the stale lock over
    assert json.loads((out / RUN_FILE).read_text())["extra"]["train"]["epochs"] == 1
    assert len((out / METRICS_FILE).read_text().splitlines()) == 1
    assert_no_leftovers(tmp_path)


def test_a_failed_force_retrain_leaves_the_old_run_intact_and_a_good_one_replaces_it_all(tmp_path):
    out = tmp_path / "run"
    before = finished_run(out)
    failed = subprocess.run([*CLI, "train", *TINY, "--lr", "1e12", "--force", "--out", str(out)], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2, failed.stderr
    assert "epoch 1" in failed.stderr and "left as it was" in failed.stderr, failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert files_of(out) == before
    assert_no_leftovers(tmp_path)

    (out / STAGING_DIR).mkdir()  # what a retrain killed (kill -9) during its first epoch leaves
    (out / STAGING_DIR / MODEL_FILE).write_bytes(b"half an epoch")
    assert main(["train", *TINY, "--seed", "1", "--force", "--out", str(out)]) == 0
    after = files_of(out)
    assert not {"eval.json", "eval-full.json", "acc-vs-eps.png"} & after.keys()  # no result of the old weights
    assert after[MODEL_FILE] != before[MODEL_FILE] and after[RUN_FILE] != before[RUN_FILE]
    assert json.loads(after[RUN_FILE])["spec"]["train"]["seed"] == 1
    assert len(after[METRICS_FILE].decode().splitlines()) == 1
    assert_no_leftovers(tmp_path)


def test_resume_with_more_epochs_extends_a_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    before = finished_run(out)
    first = json.loads(before[RUN_FILE])
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 0
    after = files_of(out)
    record = json.loads(after[RUN_FILE])
    assert record["spec"]["train"]["epochs"] == 2
    assert record["extra"]["train"]["extended_from"] == {"epochs": 1, "hash": first["hash"]}
    assert record["extra"]["train"]["resumed_from_epoch"] == 1
    assert [json.loads(line)["epoch"] for line in after[METRICS_FILE].decode().splitlines()] == [1, 2]
    assert after[MODEL_FILE] != before[MODEL_FILE]
    assert "eval.json" not in after  # it described the 1-epoch weights
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--epochs", "1", "--no-progress"]) == 2
    assert "--epochs 1" in capsys.readouterr().err
    assert files_of(out) == after
    assert main(["train", *TINY, "--lr", "0.3", "--out", str(out), "--resume", "--epochs", "3"]) == 2
    assert "holds spec" in capsys.readouterr().err  # another spec is not an extension
    assert_no_leftovers(tmp_path)


def test_allow_unfinished_evaluates_the_last_good_epoch(tmp_path, capsys):
    out = tmp_path / "run"
    finished_run(out)
    (out / RUN_FILE).unlink()  # as after a NaN in a later epoch: weights and state of the last good epoch
    (out / "eval.json").unlink()
    flags = ["--n", "8", "--steps", "2", "--no-progress"]
    assert main(["evaluate", str(out), *flags]) == 2
    assert "--allow-unfinished" in capsys.readouterr().err
    assert main(["evaluate", str(out), *flags, "--allow-unfinished"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["n_examples"] == 8 and 0 <= result["clean"] <= 1
    assert_no_leftovers(tmp_path)
