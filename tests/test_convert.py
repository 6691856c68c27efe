"""topkconv.convert: a registered defence put into any nn.Module."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import topkconv
from topkconv.config import ModelConfig
from topkconv.layers import StochasticActivationPruning, TopKConv2d, TopKLinear, TopKNeuronConv2d
from topkconv.models import build_model


class Block(nn.Module):
    """A ResNet basic block: two 3x3 convs with BatchNorm and a residual add (1x1 stride-2 shortcut)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


class StridedNet(nn.Module):
    """Convs with stride 2, dilation 2 and padding 0; the head is *defined* before the body it follows."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(12, 10, 1)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=0), nn.ReLU(),
                                  nn.Conv2d(6, 12, 3, dilation=2, padding=0), nn.ReLU())

    def forward(self, x):
        return self.head(self.body(x)).mean(dim=(2, 3))


def _with_running_stats(model):
    """BatchNorm with non-trivial statistics, so an eval-mode comparison would see a wrong mean or scale."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 3, 16, 16))
    return model.eval()


def _assert_same_outputs(original, converted, x):
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), original.eval()(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the "done when"

def test_the_one_liner_prints_one_topkconv_with_k_4_and_leaves_the_original():
    code = ("import topkconv, torch; from torch import nn; m = nn.Sequential(nn.Conv2d(3,8,3,padding=1), nn.ReLU(), "
            "nn.Conv2d(8,8,3,padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8*32*32,10)); "
            "before = repr(m); c = topkconv.convert(m, 'topk_conv', targets='last:1', k=4, "
            "example_input=torch.rand(1,3,32,32)); print(c); assert repr(m) == before; print(type(m[2]).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.count("TopKConv2d(") == 1
    assert "(2): TopKConv2d(8, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), k=4, criterion='max')" in out
    assert out.strip().endswith("Conv2d") and not out.strip().endswith("TopKConv2d")  # m[2] is still a Conv2d


# ---------------------------------------------------------------- k = fan-in computes the original

@pytest.mark.parametrize("defence,targets", [("topk_conv", None), ("tkc_neuron", None), ("dynamic_k", None)])
def test_full_k_equals_the_original_on_the_projects_vgg_small(defence, targets):
    torch.manual_seed(0)
    model = _with_running_stats(build_model(ModelConfig(arch="vgg-small", width=0.25, hidden=32, image_size=16)))
    converted = topkconv.convert(model, defence, targets=targets, k=1.0)
    routed = TopKLinear if defence == "dynamic_k" else (TopKConv2d if defence == "topk_conv" else TopKNeuronConv2d)
    assert sum(isinstance(m, routed) for m in converted.modules()) == (2 if defence == "dynamic_k" else 8)
    _assert_same_outputs(model, converted, torch.rand(3, 3, 16, 16))


def test_full_k_equals_the_original_on_vgg16():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="vgg16", image_size=32, hidden=64))
    converted = topkconv.convert(model, "topk_conv", targets="last:3", k=1.0, criterion="sum")
    converted = topkconv.convert(converted, "dynamic_k", targets="last:2", k=[512, 64])  # the fan-ins at 32 px
    assert [n for n, m in converted.named_modules() if isinstance(m, TopKConv2d)] == \
        ["features.24", "features.26", "features.28"]
    _assert_same_outputs(model, converted, torch.rand(2, 3, 32, 32))


@pytest.mark.parametrize("defence", ["topk_conv", "tkc_neuron"])
def test_full_k_equals_the_original_on_a_resnet_with_batchnorm_and_residual_adds(defence):
    torch.manual_seed(1)
    model = _with_running_stats(TinyResNet())
    converted = topkconv.convert(model, defence, k=1.0, example_input=torch.rand(1, 3, 16, 16))
    names = [n for n, m in converted.named_modules() if isinstance(m, (TopKConv2d, TopKNeuronConv2d))]
    assert names == ["stem.0", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "layer2.shortcut.0"]
    _assert_same_outputs(model, converted, torch.rand(4, 3, 16, 16))
    # a smaller k changes the function: the test above can fail
    sparse = topkconv.convert(model, defence, targets=["layer2.conv2"], k=2)
    with torch.no_grad():
        assert not torch.allclose(sparse(torch.rand(4, 3, 16, 16)), model(torch.rand(4, 3, 16, 16)))


def test_full_k_equals_the_original_with_stride_dilation_and_no_padding():
    torch.manual_seed(2)
    model = StridedNet().eval()
    converted = topkconv.convert(model, "topk_conv", k=1.0, criterion="sum")
    body = converted.body
    assert (body[0].stride, body[0].padding, body[2].dilation, body[2].padding) == ((2, 2), (0, 0), (2, 2), (0, 0))
    _assert_same_outputs(model, converted, torch.rand(3, 3, 19, 19))


# ---------------------------------------------------------------- targets, k and order

def test_last_n_follows_the_forward_pass_when_an_example_is_given():
    model = StridedNet()
    traced = topkconv.convert(model, "topk_conv", targets="last:1", k=2, example_input=torch.rand(1, 3, 19, 19))
    defined = topkconv.convert(model, "topk_conv", targets="last:1", k=2)
    assert isinstance(traced.head, TopKConv2d) and type(traced.body[2]) is nn.Conv2d  # forward: head runs last
    assert isinstance(defined.body[2], TopKConv2d) and type(defined.head) is nn.Conv2d  # definition: body is last
    assert model.training  # the traced pass ran in eval mode and put the mode back


def test_k_is_a_count_a_fraction_or_one_per_target_and_the_result_says_what_it_replaced():
    model = TinyResNet()
    converted = topkconv.convert(model, "topk_conv", targets=["layer2.conv2", "layer1.conv1"], k=[3, 0.5],
                                 criterion="sum")
    assert (converted.layer1.conv1.k, converted.layer2.conv2.k) == (3, 8)  # in definition order; 0.5 of 16
    assert "k=8, criterion='sum'" in repr(converted.layer2.conv2)
    assert converted.topkconv_replaced == [
        {"name": "layer1.conv1", "replaced": "Conv2d", "by": "TopKConv2d", "k": 3, "fan": 8, "criterion": "sum"},
        {"name": "layer2.conv2", "replaced": "Conv2d", "by": "TopKConv2d", "k": 8, "fan": 16, "criterion": "sum"}]
    assert not hasattr(model, "topkconv_replaced") and type(model.layer1.conv1) is nn.Conv2d
    chosen = topkconv.convert(model, "tkc_neuron", targets=lambda name, m: name.startswith("layer2"), k=0.25)
    assert [(n, m.k) for n, m in chosen.named_modules() if isinstance(m, TopKNeuronConv2d)] == \
        [("layer2.conv1", 4), ("layer2.conv2", 4), ("layer2.shortcut.0", 4)]


def test_converted_layers_share_the_weights_and_train():
    model = TinyResNet()
    converted = topkconv.convert(model, "topk_conv", targets="last:2", k=4, inplace=True,
                                 example_input=torch.rand(1, 3, 16, 16))
    assert converted is model and isinstance(model.layer2.shortcut[0], TopKConv2d)
    before = model.layer2.conv2.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.rand(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    assert not torch.equal(model.layer2.conv2.weight, before)


def test_dynamic_k_and_whole_model_defences():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
    routed = topkconv.convert(model, "dynamic_k", targets="last:2", k=[4, 6], positive_only=True)
    assert (routed[1].k, routed[3].k, routed[3].positive_only) == (4, 6, True)
    sap = topkconv.convert(model, "sap", sap_frac=0.5)
    assert [m.frac for m in sap.modules() if isinstance(m, StochasticActivationPruning)] == [0.5]
    with pytest.raises(ValueError, match="defence 'sap' transforms the whole model; it takes no targets="):
        topkconv.convert(model, "sap", targets="last:1")


# ---------------------------------------------------------------- errors name the target

@pytest.mark.parametrize("kwargs,message", [
    (dict(targets=["layer9.conv1"], k=2), r"target 'layer9\.conv1': no such module"),
    (dict(targets=["layer1.bn1"], k=2), r"target 'layer1\.bn1' is a BatchNorm2d, not a Conv2d"),
    (dict(targets=["layer1.conv1"], k=9), r"k for target 'layer1\.conv1' must lie in 1\.\.8"),
    (dict(targets=["layer1.conv1"], k=0), r"k for target 'layer1\.conv1' must lie in 1\.\.8.*got 0"),
    (dict(targets=["layer1.conv1"], k=1.5), r"k for target 'layer1\.conv1' as a fraction must lie in \(0, 1\]"),
    (dict(targets="last:2", k=[1, 2, 3]), r"k has 3 entries but targets selects 2 layers"),
    (dict(targets="last:9", k=2), r"targets='last:9': the model has only 6 Conv2d layers"),
    (dict(targets="first:2", k=2), r"expected 'last:N'"),
    (dict(targets="last:1"), r"k is required"),
    (dict(targets="last:1", k=2, positive_only=True), r"no layer option 'positive_only'"),
    (dict(targets="last:1", k=2, criterion="mean"), r"defense\.criterion must be one of max, sum"),
])
def test_errors_name_the_target_and_leave_the_model_alone(kwargs, message):
    model = TinyResNet()
    before = repr(model)
    with pytest.raises(ValueError, match=message):
        topkconv.convert(model, "topk_conv", inplace=True, **kwargs)
    assert repr(model) == before


@pytest.mark.parametrize("groups,word", [(2, "grouped"), (8, "depthwise")])
def test_grouped_and_depthwise_convs_are_refused_by_name(groups, word):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=groups), nn.Conv2d(8, 4, 1))
    with pytest.raises(ValueError, match=rf"target '1' is a {word} conv \(groups={groups}\)"):
        topkconv.convert(model, "topk_conv", targets="last:2", k=1.0, inplace=True)
    assert all(type(m) is nn.Conv2d for m in model)  # nothing swapped, not even the valid last conv


# ---------------------------------------------------------------- a module with two names, hooks, integer-like k

class Shared(nn.Module):
    """One conv under two names (``again`` is ``conv``), called twice in the forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.again = self.conv

    def forward(self, x):
        return self.again(torch.relu(self.conv(x)))


def _reference_routed(conv, k):
    """The same model built by hand: one TopKConv2d on the conv's weights, used at both places."""
    routed = TopKConv2d.from_conv(conv, k)
    return lambda x: routed(torch.relu(routed(x)))


@pytest.mark.parametrize("targets", [None, ["conv"], ["again"], ["conv", "again"]])
def test_a_shared_module_is_replaced_under_every_name_by_one_layer(targets):
    model = Shared()
    converted = topkconv.convert(model, "topk_conv", targets=targets, k=1)
    assert type(converted.conv) is TopKConv2d and converted.again is converted.conv  # sharing stays sharing
    x = torch.rand(2, 4, 5, 5)
    torch.testing.assert_close(converted(x), _reference_routed(model.conv, 1)(x))
    (entry,) = converted.topkconv_replaced
    assert entry["name"] == "conv" and entry["aliases"] == ["again"]
    assert type(model.conv) is nn.Conv2d  # not inplace: the original is left alone


def test_hooks_move_to_the_new_layer_and_their_handles_still_remove_them():
    model = Shared()
    seen = []
    pre = model.conv.register_forward_pre_hook(lambda module, args: seen.append(("pre", type(module).__name__)))
    post = model.conv.register_forward_hook(lambda module, args, out: seen.append(("post", type(module).__name__)))
    topkconv.convert(model, "topk_conv", k=2, inplace=True)
    model(torch.rand(1, 4, 5, 5))
    assert seen == [("pre", "TopKConv2d"), ("post", "TopKConv2d")] * 2
    pre.remove()
    post.remove()
    seen.clear()
    model(torch.rand(1, 4, 5, 5))
    assert seen == []


@pytest.mark.parametrize("k", [np.int64(2), np.int32(2), torch.tensor(2), np.float64(0.5), torch.tensor(0.5),
                               np.array([2]), torch.tensor([2])], ids=["np.int64", "np.int32", "tensor-int",
                                                                       "np.float64", "tensor-float", "np.array",
                                                                       "tensor-1d"])
def test_an_integer_like_k_is_accepted(k):
    converted = topkconv.convert(Shared(), "topk_conv", k=k)
    assert converted.conv.k == 2 and type(converted.conv.k) is int


@pytest.mark.parametrize("parametrize", ["weight_norm", "old_weight_norm", "prune"])
def test_a_parametrized_conv_is_refused_naming_the_target(parametrize):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    if parametrize == "weight_norm":
        torch.nn.utils.parametrizations.weight_norm(model[2])
    elif parametrize == "old_weight_norm":
        with pytest.warns(FutureWarning):  # deprecated by torch, still met in older code
            torch.nn.utils.weight_norm(model[2])
    else:
        from torch.nn.utils import prune

        prune.l1_unstructured(model[2], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"target '2' .*computed weight.*remove it first"):
        topkconv.convert(model, "topk_conv", k=1, inplace=True)
    assert type(model[0]) is nn.Conv2d  # nothing swapped
