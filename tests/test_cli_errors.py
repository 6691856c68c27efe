"""A careless user's mistakes at the command line: each gets one line naming the flag or file, exit status 2,
and leaves the files it must not touch as they were.

The table runs ``topkconv.cli.main`` in this process. Each case names a ``setup`` that prepares its files
under ``tmp_path`` (a copy of a finished tiny run is at ``{run}``), the argv (formatted with those paths),
the exit status, words the message must contain, and the paths whose bytes must not change.
"""

import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from topkconv.checkpoint import MODEL_FILE, RUN_FILE, STATE_DIR, STATE_FILE
from topkconv.cli import main

TINY = ["--dataset", "digits", "--limit-train", "64", "--limit-test", "32", "--width", "0.125", "--image-size", "16",
        "--hidden", "16", "--batch-size", "32", "--epochs", "1", "--no-progress"]


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """Two finished one-epoch runs with the same shapes: a standard model and one with dropout."""
    root = tmp_path_factory.mktemp("finished")
    assert main(["train", *TINY, "--defense", "standard", "--out", str(root / "standard")]) == 0
    assert main(["train", *TINY, "--defense", "dropout", "--out", str(root / "dropout")]) == 0
    return root


# ---------------------------------------------------------------- setups (each returns nothing; files under tmp)

def no_files(tmp, runs):
    pass


def a_finished_run(tmp, runs):
    shutil.copytree(runs / "standard", tmp / "run")


def a_file_named_out(tmp, runs):
    (tmp / "notes.txt").write_text("my notes\n")


def a_corrupt_state_tensor_file(tmp, runs):
    a_finished_run(tmp, runs)
    for tensors in (tmp / "run" / STATE_DIR).iterdir():
        tensors.write_bytes(b"\x00" * 7 + b"not safetensors")


def a_corrupt_state_json(tmp, runs):
    a_finished_run(tmp, runs)
    (tmp / "run" / STATE_FILE).write_text("{ torn")


def weights_of_another_defence(tmp, runs):
    a_finished_run(tmp, runs)
    shutil.copy(runs / "dropout" / MODEL_FILE, tmp / "run" / MODEL_FILE)


def an_unfinished_run(tmp, runs):
    a_finished_run(tmp, runs)
    (tmp / "run" / RUN_FILE).unlink()


def a_latin1_toml(tmp, runs):
    (tmp / "spec.toml").write_bytes('name = "caf\xe9"\n'.encode("latin-1"))


class Plant:
    """A pickle that creates a file when unpickled (a planted ``__reduce__``)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def a_cifar_batch_with_code(tmp, runs):
    root = tmp / "cifar"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        if name == "data_batch_1":
            batch[b"extra"] = Plant(str(tmp / "planted"))
        (root / name).write_bytes(pickle.dumps(batch))


def an_image_tree_with_a_corrupt_png(tmp, runs):
    for split in ("train", "test"):
        for cls in ("a", "b"):
            folder = tmp / "images" / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"img{i}.png")
    (tmp / "images" / "train" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")


def a_pth_with_code(tmp, runs):
    torch.save({"features.0.weight": torch.zeros(1), "x": Plant(str(tmp / "planted"))}, tmp / "evil.pth")


RUN_FILES = ["run/" + RUN_FILE, "run/" + MODEL_FILE, "run/" + STATE_FILE]
EVALUATE = ["evaluate", "{run}", "--no-progress"]

CASES = [  # id, setup, argv, exit status, words in the message, paths (under tmp) that must not change
    ("hidden-0", no_files, ["train", *TINY, "--hidden", "0", "--out", "{tmp}/x"], 2, ["--hidden", ">= 1"], []),
    ("warmup-negative", no_files, ["train", *TINY, "--warmup-epochs", "-1", "--out", "{tmp}/x"], 2,
     ["--warmup-epochs", ">= 0"], []),
    ("workers-negative", no_files, ["train", *TINY, "--workers", "-1", "--out", "{tmp}/x"], 2, ["--workers"], []),
    ("epochs-0", no_files, ["train", *TINY, "--epochs", "0", "--out", "{tmp}/x"], 2, ["--epochs"], []),
    ("n-negative", a_finished_run, [*EVALUATE, "--n", "-5"], 2, ["--n", ">= 1"], RUN_FILES),
    ("steps-0", a_finished_run, [*EVALUATE, "--steps", "0"], 2, ["--steps"], RUN_FILES),
    ("step-size-0", a_finished_run, [*EVALUATE, "--step-size", "0"], 2, ["--step-size", "> 0"], RUN_FILES),
    ("resume-without-out", no_files, ["train", *TINY, "--resume"], 2, ["--resume", "--out"], []),
    ("resume-and-force", a_finished_run, ["train", "--out", "{run}", "--resume", "--force"], 2,
     ["--resume", "--force"], RUN_FILES),
    ("retrain-finished-run", a_finished_run, ["train", *TINY, "--out", "{run}"], 2,
     ["already holds a finished run", "spec ", "--force", "--out", "--resume --epochs"], RUN_FILES),
    ("resume-a-finished-run", a_finished_run, ["train", "--out", "{run}", "--resume", "--no-progress"], 0, [],
     ["run/" + MODEL_FILE, "run/" + STATE_FILE]),  # nothing left to train: no error, and the weights stay
    ("out-is-a-file", a_file_named_out, ["train", *TINY, "--out", "{tmp}/notes.txt"], 2,
     ["notes.txt", "not a folder"], ["notes.txt"]),
    ("out-under-a-file", a_file_named_out, ["train", *TINY, "--out", "{tmp}/notes.txt/run"], 2,
     ["notes.txt", "cannot create"], ["notes.txt"]),
    ("evaluate-out-is-a-folder", a_finished_run, [*EVALUATE, "--out", "{tmp}"], 2, ["--out", "is a folder"],
     RUN_FILES),
    ("evaluate-out-not-writable", a_finished_run, [*EVALUATE, "--out", "{run}/" + MODEL_FILE + "/eval.json"], 2,
     ["--out", "cannot write"], RUN_FILES),
    ("corrupt-state-tensors", a_corrupt_state_tensor_file, ["train", "--out", "{run}", "--resume", "--epochs", "2"],
     2, ["epoch-0001.safetensors", "--force"], RUN_FILES),
    ("corrupt-state-json", a_corrupt_state_json, ["train", "--out", "{run}", "--resume", "--epochs", "2"], 2,
     [STATE_FILE, "JSON"], RUN_FILES),
    ("weights-of-another-defence", weights_of_another_defence, [*EVALUATE, "--n", "4"], 2,
     [MODEL_FILE, "trained for spec", RUN_FILE], RUN_FILES),
    ("unfinished-run-hint", an_unfinished_run, [*EVALUATE, "--n", "4"], 2,
     ["unfinished", "topkconv evaluate --allow-unfinished"], ["run/" + MODEL_FILE, "run/" + STATE_FILE]),
    ("toml-not-utf8", a_latin1_toml, ["train", "--spec", "{tmp}/spec.toml", "--out", "{tmp}/x"], 2,
     ["spec.toml", "UTF-8"], ["spec.toml"]),
    ("cifar-pickle-with-code", a_cifar_batch_with_code,
     ["train", "--dataset", "cifar10", "--data-root", "{tmp}/cifar", "--epochs", "1", "--out", "{tmp}/x"], 2,
     ["data_batch_1", "refused", "posix.mkdir"], ["cifar/data_batch_1"]),
    ("corrupt-png-in-a-worker", an_image_tree_with_a_corrupt_png,
     ["train", "--dataset", "imagefolder", "--data-root", "{tmp}/images", "--workers", "2", "--image-size", "8",
      "--width", "0.125", "--hidden", "8", "--batch-size", "16", "--epochs", "1", "--no-progress", "--out", "{tmp}/x"],
     2, ["broken.png", "cannot read image"], []),
    ("pth-with-code", a_pth_with_code, ["train", *TINY, "--pretrained", "{tmp}/evil.pth", "--out", "{tmp}/x"], 2,
     ["evil.pth", "posix.mkdir"], ["evil.pth"]),
]


def snapshot(tmp, paths):
    return {path: (tmp / path).read_bytes() for path in paths}


@pytest.mark.parametrize("setup, argv, status, words, unchanged", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_a_user_error_is_one_line_naming_the_flag_or_file(setup, argv, status, words, unchanged, finished_runs,
                                                          tmp_path, capsys):
    setup(tmp_path, finished_runs)
    before = snapshot(tmp_path, unchanged)
    argv = [arg.format(tmp=tmp_path, run=tmp_path / "run") for arg in argv]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse rejects a flag's value by exiting
        code = exit_.code
    err = capsys.readouterr().err
    assert code == status, err
    lines = [line for line in err.splitlines() if line.strip()]
    if status:
        assert len(lines) == 1, err
        for word in words:
            assert word in lines[0], (word, lines[0])
        assert "Traceback" not in err and "weights_only" not in err
    assert snapshot(tmp_path, unchanged) == before
    assert not (tmp_path / "planted").exists()  # no code in a data file ran
    assert not list(tmp_path.rglob(".topkconv.lock")) and not list(tmp_path.rglob("*.tmp"))


def test_ctrl_c_exits_130_with_one_line(monkeypatch, tmp_path, capsys):
    import topkconv.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(topkconv.train, "fit", interrupted)
    assert main(["train", *TINY, "--out", str(tmp_path / "x")]) == 130
    assert capsys.readouterr().err.strip() == "topkconv train: interrupted"


def test_debug_shows_the_traceback(monkeypatch, capsys):
    from topkconv.errors import UserError

    with pytest.raises(UserError, match="--resume needs --out"):
        main(["--debug", "train", "--resume"])
    with pytest.raises(UserError, match="--resume needs --out"):
        main(["train", "--resume", "--debug"])
    monkeypatch.setenv("TOPKCONV_DEBUG", "1")
    with pytest.raises(UserError, match="--resume needs --out"):
        main(["train", "--resume"])


def test_a_bug_is_not_hidden_as_a_user_error(monkeypatch, tmp_path, capsys):
    import topkconv.train

    def broken(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr(topkconv.train, "fit", broken)
    assert main(["train", *TINY, "--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err.strip() == ("topkconv train: internal error: missing key 'oops' "
                                               "(rerun with --debug for the traceback)")
    with pytest.raises(KeyError):
        main(["--debug", "train", *TINY, "--out", str(tmp_path / "x")])


def test_the_paper_preset_without_a_gpu_states_the_measured_cost_and_asks_to_confirm(monkeypatch, capsys):
    import topkconv.reproduce
    import topkconv.train

    measured = []

    def measure(model, image_size, *args, **kwargs):
        measured.append(image_size)
        return 0.4  # seconds per image

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(topkconv.train, "seconds_per_training_image", measure)
    monkeypatch.setattr(topkconv.reproduce, "reproduce", lambda *args, **kwargs: calls.append(kwargs))
    assert main(["reproduce", "--preset", "paper"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and measured == [224] and not calls
    for words in ("no GPU", "0.40 s per image", "about 10 hours", "--yes", "--device cpu"):
        assert words in err, (words, err)
    assert main(["reproduce", "--preset", "paper", "--device", "cpu"]) == 0
    assert calls[-1]["overrides"] == {"train": {"device": "cpu"}}
    assert main(["reproduce", "--preset", "paper", "--yes"]) == 0
    assert calls[-1]["overrides"] is None and measured == [224]  # confirmed: nothing measured again
    assert main(["reproduce", "--zo-reference", "--device", "cpu"]) == 0
    assert calls[-1]["overrides"] == {"train": {"device": "cpu"},
                                      "attack": {"zeroth_order": {"steps": 100, "step_size": 2.55, "sigma": 8.0,
                                                                  "samples": "reference", "examples": None}}}


def test_a_failure_of_the_computation_is_one_line_with_exit_1(monkeypatch, tmp_path, capsys):
    import topkconv.train

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2.00 GiB")

    monkeypatch.setattr(topkconv.train, "fit", out_of_memory)
    assert main(["train", *TINY, "--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err.strip() == ("topkconv train: error: CUDA out of memory. Tried to allocate 2.00 GiB "
                                               "(--debug shows the traceback)")


# ---------------------------------------------------------------- your own model: the factory and its weights (issue 21)

USER_CODE = '''
import torch
from torch import nn


def needs_an_argument(width):
    return nn.Linear(width, 10)


def raises():
    raise RuntimeError("no GPU here\\nsecond line")


def good():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
'''

FACTORY_CASES = [  # id, factory, --weights (under tmp), words in the one line
    ("factory-needs-an-argument", "{tmp}/mine.py:needs_an_argument", "{tmp}/w.safetensors",
     ["needs_an_argument()", "TypeError", "width", "no arguments"]),
    ("factory-raises", "{tmp}/mine.py:raises", "{tmp}/w.safetensors", ["raises()", "RuntimeError", "no GPU here"]),
    ("weights-is-a-folder", "{tmp}/mine.py:good", "{tmp}", ["--weights", "is a folder", "safetensors file"]),
]


@pytest.mark.parametrize("factory, weights, words", [case[1:] for case in FACTORY_CASES],
                         ids=[case[0] for case in FACTORY_CASES])
def test_a_user_factory_error_is_one_line_naming_the_factory(factory, weights, words, tmp_path, capsys):
    from safetensors.torch import save_file

    (tmp_path / "mine.py").write_text(USER_CODE)
    save_file({"1.weight": torch.zeros(10, 64), "1.bias": torch.zeros(10)}, str(tmp_path / "w.safetensors"))
    before = snapshot(tmp_path, ["mine.py", "w.safetensors"])
    argv = ["evaluate", "--model", factory.format(tmp=tmp_path), "--weights", weights.format(tmp=tmp_path),
            "--dataset", "digits", "--n", "4", "--out", str(tmp_path / "eval.json"), "--no-progress"]
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert snapshot(tmp_path, ["mine.py", "w.safetensors"]) == before and not (tmp_path / "eval.json").exists()

# ---------------------------------------------------------------- (attacks) a ValueError from a bug is not a user error

def test_a_value_error_inside_the_training_loop_is_an_internal_error_with_exit_1(monkeypatch, tmp_path, capsys):
    import torch.nn.functional as F

    def buggy_loss(*args, **kwargs):   # what a bug looks like: a ValueError raised outside topkconv's checks
        raise ValueError("too many values to unpack (expected 2)")

    monkeypatch.setattr(F, "cross_entropy", buggy_loss)
    assert main(["train", *TINY, "--out", str(tmp_path / "x")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["topkconv train: internal error: too many values to unpack (expected 2) "
                     "(rerun with --debug for the traceback)"]
    with pytest.raises(ValueError, match="too many values"):
        main(["train", *TINY, "--out", str(tmp_path / "y"), "--debug"])


def test_a_validation_error_raised_on_purpose_is_still_a_user_error(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text("[attack.pgd]\nstepz = 3\n")
    assert main(["train", "--spec", str(spec), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "spec.toml" in err and "attack.pgd.stepz" in err
    assert "internal error" not in err and "--debug" not in err

