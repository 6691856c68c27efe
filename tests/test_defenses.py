"""The defence registry: entries, flags, configs (TOML and CLI), and a toy defence that needs no edit elsewhere."""

import dataclasses
import json
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from topkconv import attacks, defenses
from topkconv.config import defense_config, ModelConfig, RunSpec, spec_from_dict
from topkconv.io import read_toml
from topkconv.layers import StochasticActivationPruning, TopKConv2d, TopKLinear
from topkconv.models import build_model

BUILT_IN = ["standard", "dropout", "dynamic_k", "topk_conv", "tkc_neuron", "sap", "pruned"]
ROUTING_ATTACKS = ("bpda_dense", "bpda_soft")   # registry names of the BPDA stand-ins

TINY_TRAIN = ["--dataset", "digits", "--image-size", "16", "--limit-train", "64", "--limit-test", "16",
              "--no-augment", "--width", "0.125", "--hidden", "16", "--epochs", "1", "--batch-size", "32",
              "--no-progress"]


def tiny(kind="standard", **options):
    return ModelConfig(arch="vgg-small", width=0.125, hidden=16, in_channels=1, mean=[0.5], std=[0.25],
                       image_size=16, defense=defense_config(kind=kind, **options))


# ---------------------------------------------------------------- the registry

def test_the_registry_holds_every_defence_with_its_own_config():
    assert list(defenses.REGISTRY) == BUILT_IN
    for name, entry in defenses.REGISTRY.items():
        cfg = entry.config()
        assert dataclasses.is_dataclass(cfg) and cfg.kind == name
        assert set(entry.adaptive_attacks) <= set(attacks.REGISTRY)   # named by the attack registry
    assert defenses.config_fields(defenses.get("standard")) == []
    assert defenses.config_fields(defenses.get("sap")) == ["sap_frac"]
    assert {"conv_k", "criterion", "fc_k"} <= set(defenses.config_fields(defenses.get("tkc_neuron")))
    with pytest.raises(ValueError, match="unknown defense 'magic'; expected one of standard, dropout"):
        defenses.get("magic")


def test_flags_and_adaptive_attacks_follow_the_paper():
    routing = {n for n, d in defenses.REGISTRY.items() if d.routing}
    stochastic = {n for n, d in defenses.REGISTRY.items() if d.stochastic}
    assert routing == {"dynamic_k", "topk_conv", "tkc_neuron"} and stochastic == {"sap"}
    assert all(defenses.get(n).adaptive_attacks == ROUTING_ATTACKS for n in routing)
    assert defenses.get("sap").adaptive_attacks == ("eot_pgd",) and defenses.get("sap").test_time_only


@pytest.mark.parametrize("kind,found,attacks", [
    ("standard", [], ()),
    ("dropout", ["dropout"], ()),
    ("dynamic_k", ["dynamic_k"], ROUTING_ATTACKS),
    ("topk_conv", ["dynamic_k", "topk_conv"], ROUTING_ATTACKS),  # on top of Dynamic-k, as in the paper
    ("tkc_neuron", ["dynamic_k", "tkc_neuron"], ROUTING_ATTACKS),
    ("sap", ["sap"], ("eot_pgd",)),
    ("pruned", [], ()),
])
def test_defences_are_recognised_inside_a_built_model(kind, found, attacks):
    options = {"fc_k": [0.1, 0.5]} if "fc_k" in defenses.config_fields(defenses.get(kind)) else {}
    model = build_model(tiny(kind, **options))
    assert [d.name for d in defenses.defenses_in(model)] == found
    assert defenses.adaptive_attacks(model) == attacks
    assert defenses.has_routing(model) == bool(set(attacks) & set(ROUTING_ATTACKS))
    assert defenses.is_stochastic(model) == (kind == "sap")


def test_the_evaluation_reads_the_registry_and_the_randomness_test():
    from topkconv.evaluate import model_traits

    plain = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    traits = model_traits(plain, torch.rand(2, 16))
    assert not traits.routing and not traits.stochastic and traits.adaptive == ()
    routed = defenses.get("dynamic_k").apply(plain, defense_config("dynamic_k", fc_k=[4, 2]))
    traits = model_traits(routed, torch.rand(2, 16))
    assert traits.routing and not traits.stochastic and traits.adaptive == ROUTING_ATTACKS
    sap = defenses.get("sap").apply(nn.Sequential(nn.Linear(16, 8), nn.ReLU()), defense_config("sap"))
    traits = model_traits(sap, torch.rand(2, 16))
    assert traits.stochastic and not traits.routing and traits.adaptive == ("eot_pgd",)


def test_apply_routes_the_last_layers_of_any_model():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3),
                        nn.ReLU(), nn.Flatten(), nn.Linear(6 * 2 * 2, 12), nn.ReLU(), nn.Linear(12, 4))
    keys = list(net.state_dict())
    defenses.get("topk_conv").apply(net, defense_config("topk_conv", conv_layers=2, conv_k=3, criterion="sum",
                                                       fc_k=[5, 2], fc_scope="final2"))
    assert [type(net[i]) for i in (0, 2, 4)] == [nn.Conv2d, TopKConv2d, TopKConv2d]
    assert (net[2].k, net[4].k, net[4].criterion) == (3, 3, "sum")
    assert isinstance(net[7], TopKLinear) and (net[7].k, net[9].k) == (5, 2)
    assert list(net.state_dict()) == keys
    assert [entry["name"] for entry in net.topkconv_replaced] == ["2", "4", "7", "9"]
    assert net(torch.rand(2, 3, 8, 8)).shape == (2, 4)


def test_sap_wraps_every_relu_and_dropout_rides_on_the_final_linear():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    keys = list(net.state_dict())
    defenses.get("sap").apply(net, defense_config("sap", sap_frac=0.5))
    saps = [m for m in net.modules() if isinstance(m, StochasticActivationPruning)]
    assert len(saps) == 2 and all(s.frac == 0.5 for s in saps)
    defenses.get("dropout").apply(net, defense_config("dropout", dropout_p=0.25))
    assert net[4].dropout.p == 0.25 and list(net.state_dict()) == keys
    net.train()
    torch.manual_seed(0)
    dropped = net[4](torch.ones(64, 8))
    assert not torch.allclose(dropped, dropped[:1].expand_as(dropped))  # the dropout draws differ per row


def test_routing_errors_name_the_option_and_the_layer():
    with pytest.raises(ValueError, match=r"defense\.conv_layers must lie in 1\.\.8"):
        build_model(tiny("topk_conv", conv_layers=9, fc_k=[0.1, 0.5]))
    with pytest.raises(ValueError, match=r"defense\.conv_k must lie in 1\.\.16.*got 40.*target 'features\.21'"):
        build_model(tiny("topk_conv", conv_k=40, fc_k=[0.1, 0.5]))
    with pytest.raises(ValueError, match=r"fc_scope='final2' routes the last 2 linear layers; the model has 1"):
        defenses.get("dynamic_k").apply(nn.Sequential(nn.Linear(4, 2)), defense_config("dynamic_k", fc_k=[1]))


# ---------------------------------------------------------------- configs: TOML and the CLI

def test_an_integer_k_stays_a_count_through_toml(tmp_path):
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text('[model.defense]\nkind = "topk_conv"\nconv_k = 10\nfc_k = [0.05, 2]\n')
    spec = spec_from_dict(read_toml(spec_file))
    assert spec.model.defense.conv_k == 10 and isinstance(spec.model.defense.conv_k, int)
    assert spec.model.defense.fc_k == [0.05, 2] and isinstance(spec.model.defense.fc_k[1], int)
    model = build_model(dataclasses.replace(tiny(), defense=spec.model.defense, width=0.5))
    routed = [m for m in model.modules() if isinstance(m, TopKConv2d)]
    assert [m.k for m in routed] == [10, 10]  # a count: 10 of 128 channels, not a fraction
    fraction = spec_from_dict({"model": {"defense": {"kind": "topk_conv", "conv_k": 0.5}}})
    assert fraction.model.defense.conv_k == 0.5
    # a float field takes an int as a float; an int field refuses a float
    assert spec_from_dict({"model": {"defense": {"kind": "dropout", "dropout_p": 0}}}).model.defense.dropout_p == 0.0
    with pytest.raises(ValueError, match=r"model\.defense\.conv_layers: expected an int, got 2\.5"):
        spec_from_dict({"model": {"defense": {"kind": "topk_conv", "conv_layers": 2.5}}})


def test_a_key_the_chosen_defence_lacks_is_an_error_naming_both():
    with pytest.raises(ValueError, match=r"unknown key 'model\.defense\.conv_k' for defense 'standard'"):
        spec_from_dict({"model": {"defense": {"conv_k": 10}}})
    with pytest.raises(ValueError, match=r"unknown key 'model\.defense\.sap_frac' for defense 'dynamic_k'"):
        spec_from_dict({"model": {"defense": {"kind": "dynamic_k", "sap_frac": 0.5}}})
    with pytest.raises(ValueError, match=r"defense\.dropout_p must lie in \[0, 1\), got 2"):
        spec_from_dict({"model": {"defense": {"kind": "dropout", "dropout_p": 2}}})
    with pytest.raises(ValueError, match="defense 'sap' has no option 'fc_k'"):
        defense_config("sap", fc_k=[1, 2])


def test_the_spec_round_trips_and_its_hash_covers_the_defence():
    spec = spec_from_dict({"model": {"defense": {"kind": "tkc_neuron", "conv_k": 3, "criterion": "sum"}}})
    assert spec_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    other_k = spec_from_dict({"model": {"defense": {"kind": "tkc_neuron", "conv_k": 4, "criterion": "sum"}}})
    other_kind = spec_from_dict({"model": {"defense": {"kind": "topk_conv", "conv_k": 3, "criterion": "sum"}}})
    assert len({spec.hash(), other_k.hash(), other_kind.hash(), RunSpec().hash()}) == 4
    assert dataclasses.replace(spec, name="x", attack=dataclasses.replace(spec.attack, eps=4.0)).hash() == spec.hash()


def test_a_run_json_of_the_flat_config_still_loads():
    flat = {"kind": "dropout", "dropout_p": 0.3, "fc_k": [250, 10], "fc_scope": "final2", "positive_only": False,
            "conv_layers": 2, "conv_k": 0.1, "criterion": "max", "sap_frac": 0.8, "prune_scope": "final",
            "prune_sparsity": 0.9, "prune_epochs": 3, "prune_lr": None}
    assert spec_from_dict({"model": {"defense": flat}}).model.defense == defense_config("dropout", dropout_p=0.3)
    partial = {k: v for k, v in flat.items() if k != "prune_lr"}  # not the old layout: every key is checked
    with pytest.raises(ValueError, match="unknown key 'model.defense.fc_k' for defense 'dropout'"):
        spec_from_dict({"model": {"defense": partial}})


@pytest.mark.parametrize("flags,message", [
    (["--conv-k", "5"], r"--conv-k: defense 'standard' has no option conv_k"),
    (["--defense", "sap", "--fc-k", "3", "2"], r"--fc-k: defense 'sap' has no option fc_k"),
    (["--defense", "dropout", "--dropout-p", "2"], r"--dropout-p: defense\.dropout_p must lie in \[0, 1\)"),
    (["--defense", "sap", "--sap-frac", "0"], r"--sap-frac: defense\.sap_frac must lie in \(0, 1\]"),
    (["--defense", "topk_conv", "--conv-k", "1.5"], r"--conv-k: defense\.conv_k as a fraction must lie in"),
])
def test_cli_defence_flags_are_checked_against_the_chosen_defence(flags, message, tmp_path, capsys):
    from topkconv.cli import main

    assert main(["train", *flags, "--out", str(tmp_path / "run")]) == 2
    import re
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_conv_k_10_trains_a_count_and_the_checkpoint_rebuilds_the_model(tmp_path):
    from topkconv.checkpoint import load_checkpoint
    from topkconv.cli import main

    run = tmp_path / "run"
    assert main(["train", *TINY_TRAIN, "--defense", "topk_conv", "--conv-k", "10", "--criterion", "sum",
                 "--fc-k", "0.1", "0.5", "--out", str(run)]) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["spec"]["model"]["arch"] == "vgg-small"
    assert record["spec"]["model"]["defense"] == {
        "kind": "topk_conv", "conv_k": 10, "conv_layers": 2, "criterion": "sum", "fc_k": [0.1, 0.5],
        "fc_scope": "final2", "positive_only": False}
    model, spec = load_checkpoint(run)
    routed = [m for m in model.modules() if isinstance(m, TopKConv2d)]
    assert [(m.k, m.criterion) for m in routed] == [(10, "sum"), (10, "sum")]
    # the rebuilt model is the trained one: same weights, same outputs
    again, _ = load_checkpoint(run)
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), again(x), rtol=0, atol=0)


@pytest.mark.slow
def test_load_checkpoint_rebuilds_what_fit_trained(tmp_path):
    from topkconv.checkpoint import load_checkpoint
    from topkconv.config import DataConfig, TrainConfig
    from topkconv.train import fit

    spec = RunSpec(name="tiny", data=DataConfig(limit_train=64, limit_test=16, image_size=16, augment=False),
                   model=ModelConfig(width=0.125, hidden=16,
                                     defense=defense_config("tkc_neuron", conv_k=3, fc_k=[0.2, 0.5])),
                   train=TrainConfig(epochs=1, batch_size=32, lr=0.05))
    trained, _ = fit(spec, tmp_path / "run", progress=False)
    loaded, loaded_spec = load_checkpoint(tmp_path / "run")
    assert loaded_spec.model.defense == spec.model.defense
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained.eval()(x), rtol=0, atol=0)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in trained.modules()]


# ---------------------------------------------------------------- a new defence: one file, no other edit

class NoisyReLU(nn.ReLU):
    """A toy test-time defence: Gaussian noise on every ReLU's output in eval mode."""

    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = sigma

    def forward(self, x):
        out = super().forward(x)
        return out if self.training else out + self.sigma * torch.randn_like(out)


@dataclass
class ToyConfig:
    kind: str = "toy_noise"
    toy_sigma: float = field(default=0.1, metadata={"help": "toy_noise: noise scale"})

    def __post_init__(self):
        if not self.toy_sigma > 0:
            raise ValueError(f"defense.toy_sigma must be positive, got {self.toy_sigma!r}")


def toy_apply(model, cfg):
    for name, module in list(model.named_modules()):
        if type(module) is nn.ReLU:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, NoisyReLU(cfg.toy_sigma))
    return model


@pytest.fixture
def toy_defence():
    entry = defenses.register(defenses.Defense("toy_noise", ToyConfig, toy_apply, stochastic=True,
                                               test_time_only=True, layer_types=(NoisyReLU,),
                                               adaptive_attacks=("eot_pgd",)))
    yield entry
    del defenses.REGISTRY["toy_noise"]


@pytest.mark.slow
def test_a_registered_toy_defence_trains_and_evaluates_from_the_cli(toy_defence, tmp_path, capsys):
    from topkconv.checkpoint import load_checkpoint
    from topkconv.cli import main

    run = tmp_path / "toy"
    assert main(["train", *TINY_TRAIN, "--defense", "toy_noise", "--toy-sigma", "0.05", "--out", str(run)]) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["spec"]["model"]["defense"] == {"kind": "toy_noise", "toy_sigma": 0.05}
    model, _ = load_checkpoint(run)
    noisy = [m for m in model.modules() if isinstance(m, NoisyReLU)]
    assert len(noisy) == 9 and all(m.sigma == 0.05 for m in noisy)
    assert defenses.adaptive_attacks(model) == ("eot_pgd",)
    assert main(["evaluate", str(run), "--n", "8", "--steps", "2", "--eot-samples", "2", "--device", "cpu",
                 "--no-progress"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["model"]["stochastic"] is True and result["n_examples"] == 8
    assert "eot_pgd" in result["attacks"]
    capsys.readouterr()
    assert main(["train", *TINY_TRAIN, "--defense", "toy_noise", "--toy-sigma", "-1", "--out", str(tmp_path / "x")]) == 2
    assert "--toy-sigma: defense.toy_sigma must be positive" in capsys.readouterr().err


def test_registering_checks_the_entry():
    @dataclass
    class Wrong:
        kind: str = "other"

    with pytest.raises(ValueError, match="`kind` field must default to 'mismatch'"):
        defenses.register(defenses.Defense("mismatch", Wrong, toy_apply))
    with pytest.raises(TypeError, match="a tuple of attack names"):   # the names are checked by the evaluation
        defenses.register(defenses.Defense("toy_noise", ToyConfig, toy_apply, adaptive_attacks="eot_pgd"))
    assert "mismatch" not in defenses.REGISTRY and "toy_noise" not in defenses.REGISTRY
