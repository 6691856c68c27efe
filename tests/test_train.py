import json

import pytest
import torch

import topkconv.train as train_module
from topkconv.checkpoint import load_checkpoint
from topkconv.cli import main
from topkconv.config import DataConfig, defense_config, ModelConfig, RunSpec, TrainConfig
from topkconv.train import NonFiniteLossError, fit, lr_factor, make_optimizer, make_scheduler


def tiny_spec(epochs=2, kind="dynamic_k", **train):
    return RunSpec(data=DataConfig(name="digits", image_size=16, limit_train=96, limit_test=32),
                   model=ModelConfig(arch="vgg-small", width=0.25, hidden=32,
                                     defense=defense_config(kind=kind, fc_k=[0.1, 0.5])),
                   train=TrainConfig(**{"epochs": epochs, "batch_size": 32, "lr": 0.02, **train}))


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


class Interrupt(Exception):
    pass


def fail_after(monkeypatch, calls, make_error):
    """Make the training loss raise (or turn NaN) after ``calls`` batches: a run killed mid-epoch."""
    real = train_module._criterion
    count = {"n": 0}

    def criterion(logits, labels):
        count["n"] += 1
        if count["n"] > calls:
            return make_error(real(logits, labels))
        return real(logits, labels)

    monkeypatch.setattr(train_module, "_criterion", criterion)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Two uninterrupted epochs (3 batches each) of a tiny Dynamic-k model with augmentation and dropout."""
    run_dir = tmp_path_factory.mktemp("straight")
    model, summary = fit(tiny_spec(), run_dir, progress=False)
    return run_dir, weights(model), summary


def test_fit_writes_a_loadable_checkpoint_and_metrics(straight_run):
    run_dir, trained, summary = straight_run
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert {"loss", "train_acc", "test_acc", "lr", "seconds"} <= lines[0].keys()
    assert lines[0]["lr"] > lines[1]["lr"]  # cosine decay
    run = json.loads((run_dir / "run.json").read_text())
    assert run["hash"] == tiny_spec().hash() and run["env"]["torch"] == torch.__version__
    assert run["spec"]["model"]["in_channels"] == 1 and run["extra"]["train"]["complete"]
    model, spec = load_checkpoint(run_dir / "model.safetensors")
    assert_same_weights(weights(model), trained)
    assert spec.model.defense.kind == "dynamic_k" and not model.training
    assert summary["test_acc"] == lines[-1]["test_acc"]


def test_a_run_json_with_a_key_an_earlier_version_wrote_still_loads_but_a_spec_with_it_is_refused(
        straight_run, tmp_path):
    import shutil

    from topkconv.config import RETIRED_KEYS, spec_from_dict

    run_dir, trained, _ = straight_run
    older = tmp_path / "older"
    shutil.copytree(run_dir, older)
    record = json.loads((older / "run.json").read_text())
    record["spec"]["attack"]["indicators"]["transfer_threshold"] = 0.1  # what 26c0f4d wrote
    (older / "run.json").write_text(json.dumps(record))
    model, _ = load_checkpoint(older)
    assert_same_weights(weights(model), trained)
    assert "attack.indicators.transfer_threshold" in RETIRED_KEYS
    with pytest.raises(ValueError, match=r"attack\.indicators\.transfer_threshold is no longer read"):
        spec_from_dict(record["spec"])


def test_dotted_keys_are_set_in_new_tables_and_retired_ones_dropped_only_where_they_are():
    from topkconv.config import with_keys, without_retired_keys

    spec = {"attack": {"indicators": {"transfer_threshold": 0.1, "alpha": 0.05}}, "seed": 3}
    assert without_retired_keys(spec) == {"attack": {"indicators": {"alpha": 0.05}}, "seed": 3}
    assert spec["attack"]["indicators"]["transfer_threshold"] == 0.1        # a copy: the input is untouched
    for older in ({"seed": 3}, {"attack": None}, {"attack": {"indicators": 7}}):  # nothing to drop, no error
        assert without_retired_keys(older) == older
    assert with_keys({"seed": 3}, {"model.defense.kind": "sap", "seed": 4}) == {
        "seed": 4, "model": {"defense": {"kind": "sap"}}}


def test_same_seed_gives_identical_weights_and_another_seed_does_not(straight_run, tmp_path):
    _, trained, _ = straight_run
    model, _ = fit(tiny_spec(), tmp_path / "again", progress=False)
    assert_same_weights(weights(model), trained)
    other, _ = fit(tiny_spec(epochs=1, seed=1), tmp_path / "other", progress=False)
    first, _ = fit(tiny_spec(epochs=1), tmp_path / "first", progress=False)
    assert not torch.equal(other.classifier[3].weight, first.classifier[3].weight)


def test_a_killed_run_resumes_to_the_same_weights(straight_run, tmp_path, monkeypatch):
    _, trained, _ = straight_run
    run_dir = tmp_path / "killed"
    fail_after(monkeypatch, 4, lambda loss: (_ for _ in ()).throw(Interrupt()))  # dies in epoch 2
    with pytest.raises(Interrupt):
        fit(tiny_spec(), run_dir, progress=False)
    assert json.loads((run_dir / "train_state.json").read_text())["epoch"] == 1
    assert not (run_dir / "run.json").exists()
    monkeypatch.undo()
    model, summary = fit(tiny_spec(), run_dir, resume=True, progress=False)
    assert summary["resumed_from_epoch"] == 1
    assert_same_weights(weights(model), trained, atol=1e-6)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert len(list((run_dir / "state").iterdir())) == 1


def test_resume_refuses_a_folder_of_another_spec(straight_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "mixed"
    fail_after(monkeypatch, 3, lambda loss: (_ for _ in ()).throw(Interrupt()))
    with pytest.raises(Interrupt):
        fit(tiny_spec(), run_dir, progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="holds spec"):
        fit(tiny_spec(lr=0.5), run_dir, resume=True, progress=False)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "nan"
    one_epoch, _ = fit(tiny_spec(epochs=1), tmp_path / "one", progress=False)
    fail_after(monkeypatch, 4, lambda loss: loss * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 2: the training loss is nan.*last good epoch \(1\) "
                       r"is kept .*`topkconv evaluate --allow-unfinished "):
        fit(tiny_spec(), run_dir, progress=False)
    with pytest.raises(FileNotFoundError, match="unfinished"):
        load_checkpoint(run_dir)
    kept, spec = load_checkpoint(run_dir, allow_unfinished=True)
    # Epoch 1 of a 2-epoch cosine run differs from a 1-epoch run only in its learning rates, so compare the
    # kept weights with the state the trainer committed, and check that they are finite and trained.
    state = train_module.load_training_state(run_dir)
    assert state["epoch"] == 1
    assert_same_weights(weights(kept), state["model"])
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not torch.equal(kept.classifier[3].weight, one_epoch.classifier[3].weight * 0)


def test_an_absurd_learning_rate_is_caught(tmp_path):
    with pytest.raises(NonFiniteLossError, match="epoch 1, step"):
        fit(tiny_spec(epochs=1, lr=1e12), tmp_path / "absurd", progress=False)


def test_schedules_and_optimizer_follow_the_config():
    cfg = TrainConfig(epochs=4, lr=0.1, schedule="step", step_size=2, gamma=0.5, warmup_epochs=1.0,
                      momentum=0.8, weight_decay=1e-3)
    assert [lr_factor(cfg, s, 10) for s in (0, 9, 10, 19, 20, 39)] == pytest.approx(
        [1 / 11, 10 / 11, 1.0, 1.0, 0.5, 0.5])
    cosine = TrainConfig(epochs=2, schedule="cosine")
    assert [lr_factor(cosine, s, 5) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = make_optimizer([param], cfg)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.8, 1e-3)
    scheduler = make_scheduler(optimizer, cfg, 10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 11)
    del scheduler
    with pytest.raises(ValueError, match="train.schedule"):
        fit(tiny_spec(schedule="linear"), "/nonexistent/never-written", progress=False)


def test_cli_trains_digits_and_the_checkpoint_loads(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["train", "--dataset", "digits", "--model", "vgg-small", "--defense", "dynamic_k",
                 "--fc-k", "0.05", "0.2", "--width", "0.25", "--image-size", "16", "--limit-train", "64",
                 "--limit-test", "32", "--batch-size", "32", "--epochs", "1", "--out", str(out), "--no-progress"])
    assert code == 0 and "test accuracy" in capsys.readouterr().out
    model, spec = load_checkpoint(out)
    assert spec.model.defense.fc_k == [0.05, 0.2] and spec.train.epochs == 1
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 10)


def test_a_log_gets_a_line_per_epoch_and_no_bar(tmp_path, capsys):
    argv = ["train", "--dataset", "digits", "--width", "0.25", "--image-size", "16", "--limit-train", "64",
            "--limit-test", "32", "--batch-size", "16", "--epochs", "2"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0  # stderr is captured: not a terminal
    err = capsys.readouterr().err
    assert "\r" not in err and [line.split(":")[0] for line in err.splitlines()] == ["epoch 1/2", "epoch 2/2"]
    assert main(argv + ["--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_cli_spec_file_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochz = 3\n")
    assert main(["train", "--spec", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err and "epochz" in err


def test_training_reaches_a_sensible_digits_accuracy(tmp_path):
    """Dynamic-k vgg-small on the embedded digits (16 px to keep it quick): far above chance (10%)."""
    spec = RunSpec(data=DataConfig(name="digits", image_size=16),
                   model=ModelConfig(arch="vgg-small", width=0.5,
                                     defense=defense_config(kind="dynamic_k", fc_k=[0.05, 0.2])),
                   train=TrainConfig(epochs=4, batch_size=64))  # the default lr, 0.05
    _, summary = fit(spec, tmp_path / "digits", progress=False)
    assert summary["test_acc"] >= 0.75, summary


def test_cli_resume_with_only_the_run_folder_continues_its_own_spec(straight_run, tmp_path, monkeypatch, capsys):
    _, trained, _ = straight_run
    run_dir = tmp_path / "killed-cli"
    fail_after(monkeypatch, 4, lambda loss: (_ for _ in ()).throw(Interrupt()))  # dies in epoch 2
    with pytest.raises(Interrupt):
        fit(tiny_spec(), run_dir, progress=False)
    monkeypatch.undo()
    assert main(["train", "--out", str(run_dir), "--resume", "--no-progress"]) == 0
    model, _ = load_checkpoint(run_dir)
    assert json.loads((run_dir / "run.json").read_text())["hash"] == tiny_spec().hash()
    assert_same_weights(weights(model), trained, atol=1e-6)
    assert main(["train", "--out", str(tmp_path / "never-started"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_seconds_per_training_image_times_real_steps():
    from topkconv.models import build_model

    model = build_model(tiny_spec().model)
    before = model.classifier[0].weight.clone()
    seconds = train_module.seconds_per_training_image(model, 16, in_channels=3, batch=2, steps=2)
    assert 0 < seconds < 60 and not torch.equal(before, model.classifier[0].weight)  # it stepped
