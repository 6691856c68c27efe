"""The non-adversarial baselines as models: SAP-80, dropout, Dynamic-k scopes (Tables I and II)."""

import pytest
import torch
from torch import nn

from topkconv.config import defense_config, ModelConfig
from topkconv.layers import StochasticActivationPruning, TopKLinear, resolve_k
from topkconv.models import build_model
from topkconv.attacks.common import seeded
from topkconv.defenses.dropout import DropoutLinear



def _tiny(kind: str, **defense) -> nn.Module:
    cfg = ModelConfig(arch="vgg-small", width=0.125, hidden=16, in_channels=1, mean=[0.5], std=[0.25],
                      image_size=16, defense=defense_config(kind=kind, **defense))
    torch.manual_seed(0)
    return build_model(cfg)


def _images(n=4):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(3))


def test_sap_follows_every_relu_with_frac_80():
    model = _tiny("sap")
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    saps = [m for m in model.modules() if isinstance(m, StochasticActivationPruning)]
    assert relus > 0 and len(saps) == relus
    assert all(s.frac == 0.8 for s in saps)


def test_sap_is_stochastic_in_eval_and_the_identity_in_training():
    model = _tiny("sap")
    x = _images()
    model.eval()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        # in training SAP is the identity: the standard model with the same weights gives the same output
        standard = _tiny("standard")
        standard.load_state_dict(model.state_dict())
        standard.train()
        assert torch.equal(model(x), standard(x))


def test_sap_is_deterministic_under_a_fixed_generator():
    """Fixed generators on the SAP layers (as the attacks seed them) make the draws, and outputs, repeat."""
    model = _tiny("sap").eval()
    x = _images()

    def run_with_generators(seed):
        for layer in model.modules():
            if isinstance(layer, StochasticActivationPruning):
                layer.generator = torch.Generator().manual_seed(seed)
        return model(x)

    with torch.no_grad():
        assert torch.equal(run_with_generators(3), run_with_generators(3))
        assert not torch.equal(run_with_generators(3), run_with_generators(4))
        with seeded(model, 7):
            first = model(x)
        with seeded(model, 7):
            again = model(x)
        with seeded(model, 8):
            other = model(x)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_dropout_sits_in_front_of_the_final_fc_layer():
    model = _tiny("dropout", dropout_p=0.3)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 1 and drops[0].p == 0.3
    final = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert isinstance(final, DropoutLinear) and final.dropout is drops[0]
    x = _images()
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("scope,routed", [("final", [False, True]), ("final2", [True, True])])
def test_dynamic_k_scopes_route_the_intended_fc_layers(scope, routed):
    model = _tiny("dynamic_k", fc_scope=scope, fc_k=[0.1, 2])
    fcs = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [isinstance(m, TopKLinear) for m in fcs] == routed
    assert fcs[-1].k == 2
    if routed[0]:
        assert fcs[0].k == resolve_k(0.1, fcs[0].in_features)
    # the standard model's weights load into every scope: Table II compares like with like
    model.load_state_dict(_tiny("standard").state_dict())


# ---------------------------------------------------------------- end to end from the command line

TINY_TRAIN = ["--dataset", "digits", "--image-size", "16", "--limit-train", "96", "--limit-test", "16",
              "--no-augment", "--width", "0.125", "--hidden", "16", "--epochs", "1", "--batch-size", "32",
              "--no-progress"]
DEFENSE_FLAGS = {
    "sap": ["--defense", "sap"],
    "dropout": ["--defense", "dropout"],
    "dynamic_k": ["--defense", "dynamic_k", "--fc-scope", "final", "--fc-k", "4"],
}


# A few images and a short PGD: this checks the plumbing, not robustness. SAP also gets the full suite,
# whose EOT-PGD is the attack that counts for a stochastic defence (Athalye et al. 2018).
EVALUATE = ["--n", "8", "--steps", "4", "--device", "cpu", "--no-progress"]
SAP_FULL = ["--suite", "full", "--eot-samples", "2", "--autoattack-attacks", "apgd-ce", "--apgd-iters", "2",
            "--square-queries", "5", "--eps-curve", "0", "8"]


def _train(run_dir, flags) -> None:
    from topkconv.cli import main

    assert main(["train", *TINY_TRAIN, *flags, "--out", str(run_dir)]) == 0


@pytest.fixture(scope="module")
def standard_run(tmp_path_factory):
    """The undefended model: not a baseline here, only the source of the pruned one."""
    run_dir = tmp_path_factory.mktemp("standard")
    _train(run_dir, [])
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sap", "dropout", "dynamic_k", "pruned"])
def test_each_baseline_trains_or_prunes_and_evaluates_from_the_cli(kind, standard_run, tmp_path, capsys):
    import json

    from topkconv.cli import main

    run_dir = tmp_path / kind
    if kind == "pruned":
        capsys.readouterr()
        assert main(["prune", str(standard_run), "--scope", "final2", "--sparsity", "0.8", "--epochs", "2",
                     "--out", str(run_dir), "--no-progress"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert set(printed["sparsity"]) == {"classifier.0", "classifier.3"}
        assert all(abs(value - 0.8) < 0.01 for value in printed["sparsity"].values())
    else:
        _train(run_dir, DEFENSE_FLAGS[kind])
    record = json.loads((run_dir / "run.json").read_text())
    assert record["spec"]["model"]["defense"]["kind"] == kind
    assert main(["evaluate", str(run_dir), *EVALUATE, *(SAP_FULL if kind == "sap" else [])]) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["n_examples"] == 8 and 0.0 <= result["clean"] <= 1.0
    assert {"fgsm", "pgd"} <= set(result["attacks"])
    assert result["model"]["stochastic"] == (kind == "sap"), kind
    if kind == "sap":
        assert "eot_pgd" in result["attacks"]
