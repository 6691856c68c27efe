"""Adversarial training (the positive control): it makes the model robust, each method runs, the examples are
crafted in eval mode inside the eps-ball, bad settings name their key, and the spec hash of a plain run stays
as it was before the feature existed."""

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import adversarial_models
from topkconv import adversarial
from topkconv.attacks import accuracy, pgd
from topkconv.cli import main
from masked_models import RoundedInput
from topkconv.config import (AdversarialConfig, AttackConfig, DataConfig, ModelConfig, RunSpec, TrainConfig,
                             spec_from_dict)
from topkconv.evaluate import evaluate
import topkconv.train as train_module
from topkconv.train import NonFiniteLossError, fit

EPS = adversarial_models.EPS / 255


def robust_accuracy(model, digits_test, steps=20):
    """PGD-20 (random start, steps of 2.5 eps / 20) at the control's radius on the 300 held-out digits."""
    x, y = digits_test
    x_adv = pgd(model, x, y, EPS, 2.5 * EPS / steps, steps, generator=torch.Generator().manual_seed(1))
    return accuracy(model, x_adv, y)


def test_pgd_training_is_markedly_more_robust_than_plain_training(digits_test):
    plain, trained = adversarial_models.trained("none"), adversarial_models.trained("pgd")
    x, y = digits_test
    plain_robust, trained_robust = robust_accuracy(plain, digits_test), robust_accuracy(trained, digits_test)
    print(f"PGD-20 at 32/255: plain {plain_robust:.3f} (clean {accuracy(plain, x, y):.3f}), "
          f"PGD-trained {trained_robust:.3f} (clean {accuracy(trained, x, y):.3f})")
    assert trained_robust > plain_robust + 0.3  # measured: 0.66 against 0.19
    assert accuracy(trained, x, y) > 0.9  # still a working classifier


@pytest.mark.parametrize("method", ["trades", "fgsm"])
def test_trades_and_fast_fgsm_training_also_give_robustness(method, digits_test):
    plain, trained = adversarial_models.trained("none"), adversarial_models.trained(method)
    plain_robust, trained_robust = robust_accuracy(plain, digits_test), robust_accuracy(trained, digits_test)
    print(f"{method}: PGD-20 at 32/255 {trained_robust:.3f} (plain {plain_robust:.3f})")
    assert trained_robust > plain_robust + 0.3  # measured: trades 0.70, fgsm 0.65, plain 0.19


# The full suite at the control's radius, shortened for a test, with the verdict presets' cascade: PGD-16 at
# Madry et al.'s step (2.5 eps / steps), AutoAttack's two APGDs, and the black-box attacks on the white-box
# survivors; the indicators on 100 examples.
CONTROL = AttackConfig(suite="full", eps=adversarial_models.EPS, eps_curve=[0, 128], n_examples=200, batch_size=128,
                       seed=0, cascade_attacks=["square", "transfer", "zeroth_order"],
                       budgets={"pgd": {"step_size": 2.5 * adversarial_models.EPS / 16, "steps": 16},
                                "autoattack": {"iterations": 20, "attacks": ["apgd-ce", "apgd-dlr"]},
                                "square": {"queries": 300},
                                "zeroth_order": {"steps": 10, "step_size": 4.0, "samples": [[0, 20]], "examples": 20}},
                       indicators={"examples": 100, "draws": 20, "steps": 30})


@pytest.fixture(scope="module")
def control_evaluation(digits_test):
    """``evaluate`` on the PGD-trained CNN ("trained") or on it behind input rounding ("rounded"), with the
    plainly trained CNN as the transfer surrogate (the undefended baseline, as in the verdict presets)."""
    cache = {}

    def run(name):
        if name not in cache:
            model = adversarial_models.trained("pgd")
            model = RoundedInput(model) if name == "rounded" else model
            cache[name] = evaluate(model, *digits_test, CONTROL, surrogate=adversarial_models.trained("none"),
                                   progress=False)
        return cache[name]

    return run


def test_the_adversarially_trained_cnn_passes_the_binarization_test_and_keeps_its_indicators_quiet(
        control_evaluation):
    result = control_evaluation("trained")
    flagged = {name: found for name, found in result["indicators"].items() if found["verdict"] == "flag"}
    assert not flagged
    assert result["verdict"]["verdict"] == "no masking indicated", result["verdict"]
    assert result["indicators"]["binarization"]["verdict"] == "pass"
    assert result["worst_case"]["accuracy"] > 0.5  # measured: 0.605 of 200 at 32/255, the plain CNN 0.175


def test_silent_success_and_incomplete_optimisation_read_the_reported_attacks_own_traces(control_evaluation,
                                                                                         digits_test):
    """Every attack at the main eps that keeps a loss trace, on the indicators' examples; not the transfer
    attack (its trace is the surrogate's), nor AutoAttack and Square (they keep none)."""
    indicators = control_evaluation("trained")["indicators"]
    traced = indicators["incomplete_optimisation"]["per_attack"]
    assert set(traced) == {"pgd_zero", "pgd_random", "pgd_2x_steps", "pgd_2x_restarts", "zeroth_order"}
    assert traced["pgd_2x_steps"]["steps"] == 32 and traced["pgd_zero"]["examples"] == 100
    assert indicators["silent_success"]["traced_examples"] == 100
    # PGD at a twentieth of its step, every variant still climbing at its end: the worst case is not settled
    slow = dataclasses.replace(CONTROL, budgets={**CONTROL.budgets, "pgd": {"step_size": 0.25, "steps": 16}})
    result = evaluate(adversarial_models.trained("pgd"), *digits_test, slow, progress=False)
    assert result["indicators"]["incomplete_optimisation"]["verdict"] == "flag", result["indicators"]


def test_the_same_evaluation_flags_the_control_once_its_gradients_are_masked(control_evaluation):
    """Input rounding zeroes the control's gradient: the indicators the control kept quiet now fire."""
    result = control_evaluation("rounded")
    verdicts = {name: found["verdict"] for name, found in result["indicators"].items()}
    for name in ("baseline_transfer", "square_beats_whitebox", "unavailable_gradients", "binarization"):
        assert verdicts[name] == "flag", verdicts
    assert result["verdict"]["verdict"] in ("masking shown", "white-box misses found", "attack too weak")


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                                  nn.Flatten(), nn.Linear(4 * 8 * 8, 10))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("method", ["pgd", "trades", "fgsm"])
def test_examples_are_crafted_in_eval_mode_inside_the_ball_and_raise_the_loss(method, digits_test):
    x, y = digits_test[0][:64], digits_test[1][:64]
    model = WithBatchNorm().train()
    for _ in range(3):  # some running statistics to protect
        model(torch.rand(16, 1, 8, 8))
    running = model.body[1].running_mean.clone()
    cfg = AdversarialConfig(method=method, eps=32.0, steps=3)
    torch.manual_seed(0)
    x_adv = adversarial.craft(model, x, y, cfg)
    assert torch.equal(model.body[1].running_mean, running)  # the attacker's passes left BatchNorm alone
    assert model.training and model.body[3].training  # every module's mode is restored
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > EPS / 2  # it moved
    trained = adversarial_models.trained("none")
    clean_loss = nn.functional.cross_entropy(trained(x), y)
    adv_loss = nn.functional.cross_entropy(trained(adversarial.craft(trained, x, y, cfg)), y)
    assert adv_loss > 2 * clean_loss


def test_default_step_sizes_follow_the_papers():
    assert adversarial.step_size(AdversarialConfig("pgd", eps=8, steps=10)) == pytest.approx(2.5 * 8 / 255 / 10)
    assert adversarial.step_size(AdversarialConfig("fgsm", eps=8)) == pytest.approx(1.25 * 8 / 255)
    assert adversarial.step_size(AdversarialConfig("trades", eps=8, step_size=2)) == pytest.approx(2 / 255)


@pytest.mark.parametrize("table,key", [
    ({"method": "madry"}, "train.adversarial.method"),
    ({"eps": 0}, "train.adversarial.eps"),
    ({"eps": 300}, "train.adversarial.eps"),
    ({"steps": 0}, "train.adversarial.steps"),
    ({"step_size": -1}, "train.adversarial.step_size"),
    ({"beta": 0}, "train.adversarial.beta"),
    ({"beta": float("nan")}, "train.adversarial.beta"),
    ({"check_examples": -1}, "train.adversarial.check_examples"),
    ({"epsilon": 8}, "train.adversarial.epsilon"),
    ({"steps": 2.5}, "train.adversarial.steps"),
])
def test_bad_settings_give_one_line_naming_the_key(table, key):
    with pytest.raises(ValueError) as err:
        spec_from_dict({"train": {"adversarial": {"method": "pgd", **table}}})
    assert key in str(err.value) and "\n" not in str(err.value)


def test_bad_settings_from_the_cli_exit_2_naming_the_key(capsys, tmp_path):
    assert main(["train", "--adversarial", "pgd", "--adv-eps", "300", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.adversarial.eps" in err[0]
    assert not (tmp_path / "x").exists()


def test_the_hash_changes_only_when_adversarial_training_is_on():
    spec = RunSpec()
    before = spec.to_dict()  # the formula of the versions without train.adversarial
    for key in ("attack", "name"):
        before.pop(key)
    before["train"].pop("adversarial")
    assert spec.hash() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:12]
    off = dataclasses.replace(spec, train=TrainConfig(adversarial=AdversarialConfig(method="none", eps=4)))
    assert off.hash() == spec.hash()
    on = dataclasses.replace(spec, train=TrainConfig(adversarial=AdversarialConfig(method="pgd")))
    trades = dataclasses.replace(spec, train=TrainConfig(adversarial=AdversarialConfig(method="trades")))
    assert len({spec.hash(), on.hash(), trades.hash()}) == 3


def tiny_spec(**adversarial_options):
    return RunSpec(data=DataConfig(name="digits", image_size=16, limit_train=64, limit_test=32),
                   model=ModelConfig(arch="vgg-small", width=0.125, hidden=16),
                   train=TrainConfig(epochs=1, batch_size=32, lr=0.02,
                                     adversarial=AdversarialConfig(**adversarial_options)))


@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_a_non_finite_loss_still_stops_adversarial_training(method, tmp_path, monkeypatch):
    real, calls = train_module._criterion, {"n": 0}

    def nan_after_the_first_epoch(logits, labels):  # 2 batches per epoch
        calls["n"] += 1
        return real(logits, labels) * (float("nan") if calls["n"] > 2 else 1.0)

    monkeypatch.setattr(train_module, "_criterion", nan_after_the_first_epoch)
    spec = tiny_spec(method=method, steps=1, check_examples=8)
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, epochs=2))
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 1: the training loss is nan.*last good epoch \(1\)"):
        fit(spec, tmp_path / "nan", progress=False)
    assert train_module.load_training_state(tmp_path / "nan")["epoch"] == 1


def test_the_cli_and_a_spec_file_train_adversarially(tmp_path):
    flags = ["--dataset", "digits", "--limit-train", "64", "--limit-test", "32", "--width", "0.125",
             "--image-size", "16", "--hidden", "16", "--batch-size", "32", "--epochs", "1", "--no-progress"]
    assert main(["train", *flags, "--adversarial", "fgsm", "--adv-eps", "16", "--adv-check-examples", "20",
                 "--out", str(tmp_path / "cli")]) == 0
    run = json.loads((tmp_path / "cli" / "run.json").read_text())
    assert run["spec"]["train"]["adversarial"] == dataclasses.asdict(
        AdversarialConfig(method="fgsm", eps=16.0, check_examples=20))
    record = json.loads((tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 <= record["test_robust_acc"] <= 1
    (tmp_path / "spec.toml").write_text('[train.adversarial]\nmethod = "trades"\neps = 16\nsteps = 2\nbeta = 3\n')
    assert main(["train", *flags, "--spec", str(tmp_path / "spec.toml"), "--out", str(tmp_path / "spec")]) == 0
    spec = json.loads((tmp_path / "spec" / "run.json").read_text())["spec"]
    assert spec["train"]["adversarial"]["method"] == "trades" and spec["train"]["adversarial"]["beta"] == 3.0


class Interrupt(Exception):
    pass


def test_a_killed_adversarial_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """The random starts draw from the generator the trainer reseeds every epoch, so a resume repeats them."""
    spec = tiny_spec(method="pgd", steps=2, check_examples=8)
    spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, epochs=2))
    straight, _ = fit(spec, tmp_path / "straight", progress=False)
    real, calls = train_module._criterion, {"n": 0}

    def die_in_epoch_two(logits, labels):
        calls["n"] += 1
        if calls["n"] > 3:
            raise Interrupt()
        return real(logits, labels)

    monkeypatch.setattr(train_module, "_criterion", die_in_epoch_two)
    with pytest.raises(Interrupt):
        fit(spec, tmp_path / "killed", progress=False)
    monkeypatch.undo()
    resumed, summary = fit(spec, tmp_path / "killed", resume=True, progress=False)
    assert summary["resumed_from_epoch"] == 1
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


def test_the_adversarial_training_table_spec_parses_and_builds():
    from topkconv.data import load_data
    from topkconv.models import build_model
    from topkconv.reproduce import load_table_spec
    from topkconv.train import resolve_spec

    experiments = Path(__file__).resolve().parents[1] / "src" / "topkconv" / "experiments"
    table = load_table_spec(experiments / "tableat-quick.toml")
    assert table.labels == ["Baseline", "Baseline + AT", "Dynamic-k + AT", "TKC-max + AT"]
    for label in table.labels:
        spec = table.run_spec(label)
        assert spec.train.adversarial.enabled == label.endswith("+ AT")
        build_model(resolve_spec(spec, load_data(spec.data)).model)
    plain = load_table_spec(experiments / "table3-quick.toml")
    assert table.run_spec("Baseline").hash() == plain.run_spec("Baseline").hash()  # Table III's run, reused
    for label in ("Dynamic-k", "TKC-max"):  # the same defences as Table III's columns
        assert table.run_spec(f"{label} + AT").model.defense == plain.run_spec(label).model.defense
