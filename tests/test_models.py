import math

import pytest
import torch
from torch import nn

from topkconv.config import defense_config, ModelConfig, spec_from_dict
from topkconv.defenses import config_fields, get
from topkconv.layers import StochasticActivationPruning, TopKConv2d, TopKLinear, TopKNeuronConv2d
from topkconv.models import build_model, load_pretrained_vgg16

VGG16_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
DEFENSES = ["standard", "dropout", "dynamic_k", "topk_conv", "tkc_neuron", "sap", "pruned"]


def small(kind="standard", **defense):
    if "fc_k" in config_fields(get(kind)):
        defense = {"fc_k": [0.05, 0.2], **defense}  # the default 250 of vgg-small's 512 features is not the point
    return ModelConfig(arch="vgg-small", in_channels=1, mean=[0.3], std=[0.3], width=0.5,
                       defense=defense_config(kind=kind, **defense))


def test_vgg16_has_torchvision_feature_keys_and_the_papers_head():
    model = build_model(ModelConfig(arch="vgg16", image_size=224))
    conv_keys = sorted({k.rsplit(".", 1)[0] for k in model.state_dict() if k.startswith("features.")},
                       key=lambda k: int(k.split(".")[1]))
    assert conv_keys == [f"features.{i}" for i in VGG16_CONVS]
    fcs = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(25088, 512), (512, 10)]
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())


def test_flatten_follows_the_input_size():
    assert build_model(ModelConfig(arch="vgg16", image_size=64)).classifier[0].in_features == 512 * 2 * 2
    assert build_model(small()).classifier[0].in_features == 128 * 2 * 2
    with pytest.raises(ValueError, match="image_size"):
        build_model(ModelConfig(arch="vgg16", image_size=16))


# The keys of vgg-small (BatchNorm on) as the builder before the defence registry made them (commit 0babfa6,
# the standard model): checkpoints, pretrained weights and pruning masks written since rely on them.
VGG_SMALL_KEYS = ["normalize.mean", "normalize.std"] + [
    f"features.{i}.{p}" for conv, bn in ((0, 1), (3, 4), (7, 8), (10, 11), (14, 15), (17, 18), (21, 22), (24, 25))
    for i, p in [(conv, "weight"), (conv, "bias"), (bn, "weight"), (bn, "bias"), (bn, "running_mean"),
                 (bn, "running_var"), (bn, "num_batches_tracked")]] + [
    "classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias"]


@pytest.mark.parametrize("kind", DEFENSES)
def test_every_defence_keeps_the_standard_parameter_names(kind):
    standard = build_model(small()).state_dict()
    model = build_model(small(kind))
    assert list(model.state_dict()) == VGG_SMALL_KEYS
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in standard.items()}
    model.load_state_dict(standard)  # a standard checkpoint loads into every defence
    out = model(torch.rand(3, 1, 32, 32))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_dynamic_k_layers_and_scopes():
    model = build_model(small("dynamic_k", fc_k=[0.05, 0.2]))
    fc1, fc2 = model.classifier[0], model.classifier[3]
    assert isinstance(fc1, TopKLinear) and fc1.k == math.ceil(0.05 * 512)
    assert isinstance(fc2, TopKLinear) and fc2.k == math.ceil(0.2 * 512)
    final = build_model(small("dynamic_k", fc_scope="final", fc_k=[7]))
    assert type(final.classifier[0]) is nn.Linear and final.classifier[3].k == 7
    assert not any(isinstance(m, (TopKConv2d, TopKNeuronConv2d)) for m in final.modules())


def test_fc_k_larger_than_the_fan_in_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"defense\.fc_k\[0\]"):
        build_model(small("dynamic_k", fc_k=[5000, 10]))  # FC 0 has 512 inputs
    with pytest.raises(ValueError, match=r"defense\.fc_k"):
        build_model(small("dynamic_k", fc_k=[1, 2, 3]))


@pytest.mark.parametrize("kind,layer", [("topk_conv", TopKConv2d), ("tkc_neuron", TopKNeuronConv2d)])
def test_routed_convs_replace_the_last_convs_on_top_of_dynamic_k(kind, layer):
    model = build_model(small(kind, conv_layers=3, conv_k=0.1, criterion="sum"))
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [type(c) is layer for c in convs] == [False] * 5 + [True] * 3
    fan = convs[-1].in_channels if kind == "topk_conv" else convs[-1].out_channels
    assert convs[-1].k == math.ceil(0.1 * fan) and convs[-1].criterion == "sum"
    assert isinstance(model.classifier[0], TopKLinear) and isinstance(model.classifier[3], TopKLinear)
    with pytest.raises(ValueError, match="conv_layers"):
        build_model(small(kind, conv_layers=9))


def test_full_k_routing_equals_the_standard_model():
    torch.manual_seed(0)
    standard = build_model(small()).eval()
    routed = build_model(small("topk_conv", fc_k=[1.0, 1.0], conv_k=1.0, conv_layers=2)).eval()
    routed.load_state_dict(standard.state_dict())
    x = torch.rand(4, 1, 32, 32)
    torch.testing.assert_close(routed(x), standard(x), rtol=1e-4, atol=1e-5)


def test_normalisation_is_inside_the_model():
    model = build_model(small())
    x = torch.rand(2, 1, 32, 32)
    expected = model.classifier(torch.flatten(model.features((x - 0.3) / 0.3), 1))
    torch.testing.assert_close(model(x), expected)
    with pytest.raises(ValueError, match="in_channels"):
        build_model(ModelConfig(arch="vgg-small", in_channels=1, mean=[0.5, 0.5, 0.5]))


def test_sap_acts_only_in_eval_mode_after_every_relu():
    model = build_model(small("sap"))
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    saps = [m for m in model.modules() if isinstance(m, StochasticActivationPruning)]
    assert len(saps) == len(relus) == 9 and saps[0].frac == 0.8
    x = torch.rand(2, 1, 32, 32)
    model.train()
    torch.testing.assert_close(model(x), model(x))
    model.eval()
    assert not torch.equal(model(x), model(x))


def test_dropout_sits_in_front_of_the_final_fc_layer():
    model = build_model(small("dropout", dropout_p=0.3))
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 1 and drops[0].p == 0.3 and drops[0] is model.classifier[3].dropout
    assert isinstance(model.classifier[3], nn.Linear) and isinstance(model.classifier[2], nn.Identity)


def test_unknown_arch_or_defence_is_named():
    with pytest.raises(ValueError, match="model.arch"):
        build_model(ModelConfig(arch="resnet"))
    with pytest.raises(ValueError, match="unknown defense 'magic'; expected one of standard, dropout"):
        build_model(ModelConfig(defense=defense_config(kind="magic")))
    with pytest.raises(ValueError, match=r"model\.defense\.kind.*'magic'"):
        spec_from_dict({"model": {"defense": {"kind": "magic"}}})


# ---------------------------------------------------------------- pretrained weights

@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    """A file with torchvision's VGG16 feature keys and shapes (random values) plus an unused classifier key."""
    torch.manual_seed(1)
    source = build_model(ModelConfig(arch="vgg16", image_size=32))
    state = {f"features.{k}": v.clone() for k, v in source.features.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)
    path = tmp_path_factory.mktemp("weights") / "vgg16-397923af.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("kind", ["standard", "topk_conv", "tkc_neuron"])
def test_pretrained_vgg16_loads_into_features_whatever_the_defence(vgg16_file, kind):
    path, state = vgg16_file
    model = build_model(ModelConfig(arch="vgg16", image_size=32, defense=defense_config(kind=kind)))
    loaded = load_pretrained_vgg16(model, path)
    assert len(loaded) == 26
    for key in loaded:
        assert torch.equal(model.state_dict()[key], state[key])


def test_pretrained_errors_name_the_file_and_key(tmp_path, vgg16_file):
    model = build_model(ModelConfig(arch="vgg16", image_size=32))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_pretrained_vgg16(model, tmp_path / "nowhere.pth")
    _, state = vgg16_file
    missing = {k: v for k, v in state.items() if k != "features.28.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing\.pth.*features\.28\.bias"):
        load_pretrained_vgg16(model, tmp_path / "missing.pth")
    wrong = dict(state, **{"features.0.weight": torch.zeros(64, 1, 3, 3)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"features\.0\.weight.*\(64, 1, 3, 3\)"):
        load_pretrained_vgg16(model, tmp_path / "wrong.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_pretrained_vgg16(model, tmp_path / "junk.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth.*state_dict"):
        load_pretrained_vgg16(model, tmp_path / "list.pth")


# ---------------------------------------------------------------- the paper's model at full size

@pytest.mark.parametrize("kind", DEFENSES)
def test_paper_vgg16_forward_and_backward_at_224px(kind):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="vgg16", image_size=224, defense=defense_config(kind=kind)))
    model.eval()  # SAP acts at eval; gradients still flow (attacks differentiate the eval model)
    x = torch.rand(2, 3, 224, 224, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert model.features[0].weight.grad is not None and model.classifier[0].weight.grad.abs().sum() > 0


def test_batch_norm_defaults_follow_the_arch():
    assert any(isinstance(m, nn.BatchNorm2d) for m in build_model(small()).modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in build_model(ModelConfig(arch="vgg16", image_size=32)).modules())
    plain = ModelConfig(arch="vgg-small", in_channels=1, mean=[0.3], std=[0.3], batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in build_model(plain).modules())


def test_dynamic_k_starts_at_a_dense_layers_output_scale():
    """Without the gain, the top 5% of 1024 products sum to ~3x a dense output and training diverges."""
    torch.manual_seed(0)
    cfg = dict(arch="vgg-small", in_channels=1, mean=[0.3], std=[0.3], batch_norm=False)
    dense = build_model(ModelConfig(**cfg)).classifier[0]
    routed = build_model(ModelConfig(**cfg, defense=defense_config(kind="dynamic_k", fc_k=[0.05, 0.2]))).classifier[0]
    features = torch.relu(torch.randn(256, dense.in_features))
    ratio = routed(features).pow(2).mean().sqrt() / dense(features).pow(2).mean().sqrt()
    assert 0.5 < ratio < 2.0, ratio


def test_torchvision_architectures_need_the_vision_extra():
    import importlib.util

    cfg = ModelConfig(arch="torchvision:resnet18", in_channels=1, mean=[0.3], std=[0.3])
    if importlib.util.find_spec("torchvision") is None:  # the main environment: a clear error, not a crash
        with pytest.raises(ValueError, match=r"needs torchvision: pip install 'topkconv\[vision\]'"):
            build_model(cfg)
    else:
        assert build_model(cfg)(torch.rand(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("field, value", [("hidden", 0), ("hidden", -3), ("width", 0.0)])
def test_a_zero_width_layer_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"model.{field}"):
        build_model(ModelConfig(**{field: value}))
