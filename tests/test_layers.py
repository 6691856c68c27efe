"""The routing layers against the naive formulas of the paper (tests/reference.py)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference import (naive_selection_conv, naive_selection_linear, naive_selection_neuron, naive_tkc_neuron,
                       naive_topk_conv2d, naive_topk_linear, seeded_without_ties)
from topkconv import functional as TF
from topkconv.layers import StochasticActivationPruning, TopKConv2d, TopKLinear, TopKNeuronConv2d, dense_gradients

IMPLS = ["reference", "auto", "torch"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ------------------------------------------------------------------ TopKLinear

LINEAR_CASES = [  # batch, in, out, k, positive_only
    (1, 7, 3, 1, False),
    (4, 13, 5, 4, False),
    (3, 10, 6, 10, False),
    (5, 9, 4, 3, True),
    (2, 6, 2, 6, True),
]


def _linear_inputs(batch, fan_in, fan_out, k):
    def make(g):
        return (torch.randn(batch, fan_in, generator=g, dtype=torch.float64),
                torch.randn(fan_out, fan_in, generator=g, dtype=torch.float64),
                torch.randn(fan_out, generator=g, dtype=torch.float64))
    return seeded_without_ties(make, lambda x, w, b: x[:, None, :] * w[None], k)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch,fan_in,fan_out,k,positive_only", LINEAR_CASES)
def test_topk_linear_matches_naive(impl, batch, fan_in, fan_out, k, positive_only):
    x, w, b = _linear_inputs(batch, fan_in, fan_out, k)
    layer = TopKLinear(fan_in, fan_out, k, positive_only=positive_only, impl=impl).double()
    layer.load_state_dict({"weight": w, "bias": b})
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    w2, b2 = w.clone().requires_grad_(), b.clone().requires_grad_()
    ours = layer(xa)
    naive = naive_topk_linear(xb, w2, b2, k, positive_only)
    torch.testing.assert_close(ours, naive)
    grad_out = torch.randn_like(ours)
    ours.backward(grad_out)
    naive.backward(grad_out)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(layer.weight.grad, w2.grad)
    torch.testing.assert_close(layer.bias.grad, b2.grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_linear_gradcheck(impl):
    x, w, b = _linear_inputs(3, 8, 4, 3)
    inputs = tuple(t.clone().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: TF.topk_linear(x, w, b, 3, impl=impl), inputs)


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_linear_full_k_is_linear(impl):
    torch.manual_seed(0)
    dense = nn.Linear(12, 5)
    layer = TopKLinear(12, 5, 12, impl=impl)
    layer.load_state_dict(dense.state_dict())
    x = torch.randn(6, 12)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    assert TopKLinear(12, 5, 1.0).k == 12


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_linear_gradient_reaches_only_selected_weights(impl):
    x, w, b = _linear_inputs(1, 9, 4, 2)
    layer = TopKLinear(9, 4, 2, impl=impl).double()
    layer.load_state_dict({"weight": w, "bias": b})
    layer(x).sum().backward()
    selected = torch.zeros_like(w, dtype=torch.bool)
    selected.scatter_(1, (x * w).topk(2, dim=1).indices, True)
    assert (layer.weight.grad[~selected] == 0).all()
    assert (layer.weight.grad[selected] != 0).all()


# ------------------------------------------------------------------ TopKConv2d

CONV_CASES = [  # batch, in, out, H, W, kernel, stride, padding, k, criterion
    (1, 3, 2, 5, 5, 3, 1, 0, 1, "max"),
    (2, 4, 3, 7, 6, 3, 2, 1, 2, "max"),
    (3, 5, 4, 6, 5, 1, 1, 0, 3, "max"),
    (2, 3, 2, 9, 8, 5, 2, 1, 2, "max"),
    (1, 3, 2, 5, 5, 3, 1, 1, 1, "sum"),
    (2, 4, 3, 7, 6, 3, 2, 0, 2, "sum"),
    (3, 5, 4, 6, 5, 1, 1, 1, 3, "sum"),
    (2, 3, 2, 9, 8, 5, 1, 1, 2, "sum"),
]


def _conv_tensors(batch, cin, cout, h, w, kernel):
    """A maker of float64 (input, weight, bias) of a convolution, for :func:`seeded_without_ties`."""
    def make(g):
        return (torch.randn(batch, cin, h, w, generator=g, dtype=torch.float64),
                torch.randn(cout, cin, kernel, kernel, generator=g, dtype=torch.float64),
                torch.randn(cout, generator=g, dtype=torch.float64))
    return make


def _conv_inputs(batch, cin, cout, h, w, kernel, stride, padding, k, criterion):
    return seeded_without_ties(_conv_tensors(batch, cin, cout, h, w, kernel),
                               lambda x, w, b: TF.channel_scores(TF.channel_maps(x, w, stride, padding), criterion), k)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch,cin,cout,h,w,kernel,stride,padding,k,criterion", CONV_CASES)
def test_topk_conv2d_matches_naive(impl, batch, cin, cout, h, w, kernel, stride, padding, k, criterion):
    x, weight, bias = _conv_inputs(batch, cin, cout, h, w, kernel, stride, padding, k, criterion)
    layer = TopKConv2d(cin, cout, kernel, k, criterion, stride=stride, padding=padding, impl=impl).double()
    _assert_conv_layer_matches(layer, lambda *t: naive_topk_conv2d(*t, k, criterion, stride, padding), x, weight, bias)


def _assert_conv_layer_matches(layer, naive, x, weight, bias):
    """The layer, loaded with ``weight`` and ``bias``, against ``naive(x, weight, bias)``: output and the
    gradients of input, weight and bias for one random output gradient."""
    layer.load_state_dict({"weight": weight, "bias": bias})
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    w2, b2 = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    ours, expected = layer(xa), naive(xb, w2, b2)
    torch.testing.assert_close(ours, expected)
    grad_out = torch.randn_like(ours)
    ours.backward(grad_out)
    expected.backward(grad_out)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(layer.weight.grad, w2.grad)
    torch.testing.assert_close(layer.bias.grad, b2.grad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("criterion", ["max", "sum"])
def test_topk_conv2d_gradcheck(impl, criterion):
    x, w, b = _conv_inputs(2, 4, 3, 5, 5, 3, 1, 1, 2, criterion)
    inputs = tuple(t.clone().requires_grad_() for t in (x, w, b))
    fn = lambda x, w, b: TF.topk_conv2d(x, w, b, 2, criterion, 1, 1, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)  # a random projection: same check, far fewer evaluations


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("criterion", ["max", "sum"])
@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1)])
def test_topk_conv2d_full_k_is_conv2d(impl, criterion, stride, padding):
    torch.manual_seed(0)
    dense = nn.Conv2d(6, 4, 3, stride=stride, padding=padding)
    layer = TopKConv2d(6, 4, 3, 6, criterion, stride=stride, padding=padding, impl=impl)
    layer.load_state_dict(dense.state_dict())
    x = torch.randn(3, 6, 9, 9)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("criterion", ["max", "sum"])
def test_topk_conv2d_gradient_reaches_only_selected_weights(impl, criterion):
    x, w, b = _conv_inputs(1, 5, 4, 6, 6, 3, 1, 1, 2, criterion)
    layer = TopKConv2d(5, 4, 3, 2, criterion, padding=1, impl=impl).double()
    layer.load_state_dict({"weight": w, "bias": b})
    layer(x).sum().backward()
    chosen = naive_selection_conv(x, w, 2, criterion, 1, 1)[0]
    for c in range(4):
        for i in range(5):
            touched = bool(layer.weight.grad[c, i].abs().sum() > 0)
            assert touched == ((c, i) in chosen), (c, i)


# ------------------------------------------------------------------ TKC-neuron

NEURON_CASES = [  # batch, in, out, H, W, kernel, stride, padding, k, criterion
    (1, 3, 6, 5, 5, 3, 1, 0, 2, "max"),
    (3, 4, 5, 7, 6, 3, 2, 1, 3, "max"),
    (2, 2, 4, 6, 5, 1, 1, 0, 1, "max"),
    (2, 3, 5, 9, 8, 5, 1, 1, 2, "sum"),
]


def _neuron_inputs(batch, cin, cout, h, w, kernel, stride, padding, k, criterion):
    return seeded_without_ties(_conv_tensors(batch, cin, cout, h, w, kernel),
                               lambda x, w, b: TF.channel_scores(F.conv2d(x, w, b, stride, padding), criterion), k)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch,cin,cout,h,w,kernel,stride,padding,k,criterion", NEURON_CASES)
def test_tkc_neuron_matches_naive(impl, batch, cin, cout, h, w, kernel, stride, padding, k, criterion):
    x, weight, bias = _neuron_inputs(batch, cin, cout, h, w, kernel, stride, padding, k, criterion)
    layer = TopKNeuronConv2d(cin, cout, kernel, k, criterion, stride=stride, padding=padding, impl=impl).double()
    _assert_conv_layer_matches(layer, lambda *t: naive_tkc_neuron(*t, k, criterion, stride, padding), x, weight, bias)


@pytest.mark.parametrize("impl", IMPLS)
def test_tkc_neuron_gradcheck(impl):
    x, w, b = _neuron_inputs(2, 3, 5, 5, 5, 3, 1, 1, 2, "max")
    inputs = tuple(t.clone().requires_grad_() for t in (x, w, b))
    fn = lambda x, w, b: TF.topk_neuron_conv2d(x, w, b, 2, "max", 1, 1, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_tkc_neuron_keeps_exactly_k_channels():
    torch.manual_seed(0)
    layer = TopKNeuronConv2d(3, 8, 3, 3, padding=1)
    y = layer(torch.randn(4, 3, 6, 6))
    alive = (y.abs().sum((2, 3)) > 0).sum(1)
    assert alive.tolist() == [3, 3, 3, 3]


# ------------------------------------------------------------------ SAP

def test_sap_is_identity_in_train_mode_and_random_in_eval():
    h = torch.relu(torch.randn(4, 50))
    sap = StochasticActivationPruning(0.8)
    sap.train()
    assert torch.equal(sap(h), h)
    sap.eval()
    a, b = sap(h), sap(h)
    assert not torch.equal(a, b)
    assert ((a == 0) | (h != 0)).all()  # never invents activations
    assert (a == 0).any()  # prunes something


def test_sap_fixed_generator_is_deterministic():
    h = torch.relu(torch.randn(3, 2, 4, 4))
    a = StochasticActivationPruning(0.5, torch.Generator().manual_seed(7)).eval()(h)
    b = StochasticActivationPruning(0.5, torch.Generator().manual_seed(7)).eval()(h)
    assert torch.equal(a, b)


def test_sap_monte_carlo_mean_approaches_input():
    torch.manual_seed(0)
    h = torch.relu(torch.randn(2, 30, dtype=torch.float64)) + 0.05
    sap = StochasticActivationPruning(0.3, torch.Generator().manual_seed(1)).eval()
    mean = torch.stack([sap(h) for _ in range(4000)]).mean(0)
    assert (mean - h).abs().max() < 0.1 * h.max()
    # ... and a single draw is far from it, so the test can fail
    assert (sap(h) - h).abs().max() > 0.1 * h.max()


def test_sap_scale_matches_formula():
    from reference import naive_sap_expectation_scale
    h = torch.relu(torch.randn(1, 40, dtype=torch.float64)) + 0.01
    out = StochasticActivationPruning(0.8, torch.Generator().manual_seed(3)).eval()(h)
    kept = out != 0
    torch.testing.assert_close(out[kept], (h / naive_sap_expectation_scale(h[0], 0.8))[kept])


@pytest.mark.parametrize("numba_merge", [True, False], ids=["numba-merge", "torch-searchsorted"])
def test_sap_draws_hit_each_activation_with_the_naive_probability(numba_merge, monkeypatch):
    # r draws with replacement hit category j with probability 1 - (1 - p_j)^r (SAP's formula); drawing
    # without replacement, or a shifted bin edge, would not. 20,000 rows are 20,000 independent trials.
    from topkconv.layers.kernels import sampling
    monkeypatch.setattr(sampling, "NUMBA_AVAILABLE", numba_merge and sampling.NUMBA_AVAILABLE)
    weights = torch.tensor([0.5, 3.0, 0.0, 1.0, 0.2, 2.0, 0.0, 0.8], dtype=torch.float64)
    p, draws, trials = weights / weights.sum(), 4, 20_000
    hits = sampling.categories_hit(weights.expand(trials, -1), draws, torch.Generator().manual_seed(0))
    expected = 1 - (1 - p) ** draws
    standard_error = (expected * (1 - expected) / trials).sqrt()
    assert ((hits.double().mean(0) - expected).abs() <= 4 * standard_error + 1e-12).all(), hits.double().mean(0)
    assert not hits[:, weights == 0].any()


def test_sap_numba_merge_and_torch_searchsorted_hit_the_same_categories(monkeypatch):
    from topkconv.layers.kernels import sampling
    weights = torch.rand(64, 300, generator=torch.Generator().manual_seed(1)) * (torch.rand(64, 300) > 0.3)
    compiled = sampling.categories_hit(weights, 240, torch.Generator().manual_seed(5))
    monkeypatch.setattr(sampling, "NUMBA_AVAILABLE", False)
    plain = sampling.categories_hit(weights, 240, torch.Generator().manual_seed(5))
    assert torch.equal(compiled, plain)
    assert 0 < compiled.sum() < compiled.numel()


# ------------------------------------------------------------------ BPDA switch

@pytest.mark.parametrize("make", [
    lambda: TopKLinear(12, 4, 2),
    lambda: TopKConv2d(6, 4, 3, 2, padding=1),
    lambda: TopKConv2d(6, 4, 3, 2, "sum", padding=1),
    lambda: TopKNeuronConv2d(6, 4, 3, 1, padding=1),
])
def test_bpda_switch_changes_gradients_not_outputs(make):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(3, 12) if isinstance(layer, TopKLinear) else torch.randn(3, 6, 5, 5)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    plain = layer(xa)
    plain.sum().backward()
    with dense_gradients():
        bpda = layer(xb)
        bpda.sum().backward()
    torch.testing.assert_close(plain, bpda)
    assert not torch.allclose(xa.grad, xb.grad)
    dense = nn.Linear(12, 4) if isinstance(layer, TopKLinear) else nn.Conv2d(6, 4, 3, padding=1)
    dense.load_state_dict(layer.state_dict())
    xc = x.clone().requires_grad_()
    dense(xc).sum().backward()
    torch.testing.assert_close(xb.grad, xc.grad)


# ------------------------------------------------------------------ argument checks

BAD_ARGUMENTS = [
    (lambda: TopKLinear(10, 3, 0), "k"),
    (lambda: TopKLinear(10, 3, 11), "k"),
    (lambda: TopKLinear(10, 3, 1.5), "k"),
    (lambda: TopKLinear(10, 3, 0.0), "k"),
    (lambda: TopKLinear(10, 3, True), "k"),
    (lambda: TopKConv2d(4, 3, 3, 5), "k"),
    (lambda: TopKConv2d(4, 3, 3, 0), "k"),
    (lambda: TopKConv2d(4, 3, 3, 2, criterion="mean"), "criterion"),
    (lambda: TopKNeuronConv2d(4, 3, 3, 4), "k"),
    (lambda: TopKNeuronConv2d(4, 3, 3, 2, criterion="median"), "criterion"),
    (lambda: StochasticActivationPruning(0.0), "frac"),
    (lambda: StochasticActivationPruning(1.2), "frac"),
    (lambda: TopKLinear(10, 3, 2, impl="magic"), "impl"),
]


@pytest.mark.parametrize("build,argument", BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error_naming_the_argument(build, argument):
    with pytest.raises(ValueError, match=rf"^{argument}\b"):
        build()


def test_fraction_k_rounds_up():
    assert TopKLinear(25088, 512, 0.01).k == 251
    assert TopKConv2d(512, 512, 3, 0.1).k == 52
    assert TopKConv2d(10, 4, 3, 0.1).k == 1


# ------------------------------------------------------------------ from_dense

def _dense_pairs():
    """(dense layer, routing class, k = fan-in, input) for every layer kind, with uncommon geometry."""
    torch.manual_seed(0)
    return [
        (nn.Linear(12, 5), TopKLinear, 12, torch.randn(3, 12)),
        (nn.Linear(12, 5, bias=False), TopKLinear, 12, torch.randn(3, 12)),
        (nn.Conv2d(6, 4, 3, stride=2, padding=0, dilation=2), TopKConv2d, 6, torch.randn(2, 6, 11, 11)),
        (nn.Conv2d(6, 4, (3, 1), stride=(1, 2), padding=(1, 0), bias=False), TopKConv2d, 6, torch.randn(2, 6, 7, 7)),
        (nn.Conv2d(6, 4, 3, padding="same", dilation=2), TopKConv2d, 6, torch.randn(2, 6, 9, 9)),
        (nn.Conv2d(6, 8, 3, stride=2, padding=1, dilation=2), TopKNeuronConv2d, 8, torch.randn(2, 6, 11, 11)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_from_dense_keeps_parameters_and_geometry_and_full_k_equals_dense(case):
    dense, cls, k, x = _dense_pairs()[case]
    routed = cls.from_dense(dense, k)
    assert routed.weight is dense.weight  # the same Parameter objects, not copies
    assert routed.bias is dense.bias      # (None stays None)
    assert routed.weight.device == dense.weight.device and routed.weight.dtype == dense.weight.dtype
    if isinstance(dense, nn.Conv2d):
        assert (routed.stride, routed.dilation, routed.kernel_size) == (dense.stride, dense.dilation, dense.kernel_size)
        assert isinstance(routed.padding, tuple)
    assert routed.k == k
    torch.testing.assert_close(routed(x), dense(x), rtol=1e-5, atol=1e-5)
    # a real top-k (k below fan-in) differs, so the check can fail
    if k > 1:
        smaller = cls.from_dense(dense, k // 2)
        assert not torch.allclose(smaller(x), dense(x))


def test_from_dense_aliases_and_options_and_dtype():
    conv = nn.Conv2d(6, 4, 3, padding=1).double()
    routed = TopKConv2d.from_conv(conv, 0.5, criterion="sum", impl="reference")
    assert (routed.k, routed.criterion, routed.impl, routed.weight.dtype) == (3, "sum", "reference", torch.float64)
    assert TopKNeuronConv2d.from_conv(conv, 2).k == 2
    linear = nn.Linear(10, 3).double()
    routed_linear = TopKLinear.from_linear(linear, 4, positive_only=True)
    assert routed_linear.positive_only and routed_linear.weight is linear.weight
    assert "k=4" in repr(routed_linear) and "criterion='sum'" in repr(routed)
    assert not TopKLinear.from_dense(linear.eval(), 3).training


@pytest.mark.parametrize("device", DEVICES)
def test_from_dense_keeps_the_device(device):
    dense = nn.Conv2d(6, 4, 3, padding=1).to(device)
    routed = TopKConv2d.from_dense(dense, 2)
    assert routed.weight.device.type == device and routed.bias.device.type == device
    assert routed(torch.randn(2, 6, 5, 5, device=device)).device.type == device


@pytest.mark.parametrize("build,problem", [
    (lambda: TopKConv2d.from_conv(nn.Conv2d(6, 4, 3, groups=2), 2), "groups=2"),
    (lambda: TopKConv2d.from_conv(nn.Conv2d(6, 6, 3, groups=6), 2), "groups=6"),
    (lambda: TopKNeuronConv2d.from_conv(nn.Conv2d(6, 4, 3, groups=2), 2), "groups=2"),
    (lambda: TopKConv2d.from_conv(nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect"), 2), "padding_mode='reflect'"),
    (lambda: TopKNeuronConv2d.from_conv(nn.Conv2d(6, 4, 3, padding=1, padding_mode="circular"), 2), "padding_mode"),
    (lambda: TopKConv2d.from_conv(nn.Conv2d(6, 4, 2, padding="same"), 2), "padding='same'"),
    (lambda: TopKConv2d.from_conv(nn.Linear(6, 4), 2), "nn.Conv2d"),
    (lambda: TopKLinear.from_linear(nn.Conv2d(6, 4, 3), 2), "nn.Linear"),
])
def test_from_dense_refuses_what_it_cannot_route(build, problem):
    with pytest.raises(ValueError, match=re.escape(problem)) as err:
        build()
    assert "from_dense" in str(err.value)


# ------------------------------------------------------------------ selection()

@pytest.mark.parametrize("impl", IMPLS + ["numba"])
@pytest.mark.parametrize("positive_only", [False, True])
def test_linear_selection_matches_naive(impl, positive_only):
    x, w, b = _linear_inputs(4, 13, 5, 4)
    layer = TopKLinear(13, 5, 4, positive_only=positive_only, impl=impl).double()
    layer.load_state_dict({"weight": w, "bias": b})
    chosen = layer.selection(x)
    assert chosen.shape == (4, 5, 4) and chosen.dtype == torch.long
    naive = naive_selection_linear(x, w, 4, positive_only)
    # under positive_only a row with fewer than k positive products picks among tied zeros: any
    # choice is right there, so only the positive (really routed) products are compared
    positive = x[:, None, :] * w[None] > 0
    keep = (lambda b, c, i: bool(positive[b, c, i])) if positive_only else (lambda b, c, i: True)
    ours = [[{i for i in row if keep(b, c, i)} for c, row in enumerate(sample)] for b, sample in enumerate(chosen.tolist())]
    assert ours == [[{i for i in row if keep(b, c, i)} for c, row in enumerate(sample)] for b, sample in enumerate(naive)]
    assert not positive_only or any(len(row) < 4 for sample in ours for row in sample)  # the case is exercised
    mask = layer.selection_mask(x)
    assert mask.shape == (4, 5, 13) and mask.dtype == torch.bool
    products = x[:, None, :] * w[None]
    if positive_only:
        products = products.clamp(min=0)
    torch.testing.assert_close((products * mask).sum(-1) + b, layer(x))


@pytest.mark.parametrize("impl", IMPLS + ["numba"])
@pytest.mark.parametrize("criterion", ["max", "sum"])
def test_conv_selection_matches_naive(impl, criterion):
    x, w, b = _conv_inputs(2, 5, 4, 7, 6, 3, 2, 1, 2, criterion)
    layer = TopKConv2d(5, 4, 3, 2, criterion, stride=2, padding=1, impl=impl).double()
    layer.load_state_dict({"weight": w, "bias": b})
    chosen = layer.selection(x)
    assert chosen.shape == (2, 4, 2) and chosen.dtype == torch.long
    naive = naive_selection_conv(x, w, 2, criterion, 2, 1)
    assert [{(c, i) for c, row in enumerate(sample) for i in row} for sample in chosen.tolist()] == naive
    mask = layer.selection_mask(x)
    assert mask.shape == (2, 4, 5) and (mask.sum(-1) == 2).all()
    assert [{tuple(p) for p in m.nonzero().tolist()} for m in mask] == naive


@pytest.mark.parametrize("criterion", ["max", "sum"])
def test_neuron_selection_matches_naive(criterion):
    x, w, b = _neuron_inputs(3, 3, 6, 7, 6, 3, 1, 1, 2, criterion)
    layer = TopKNeuronConv2d(3, 6, 3, 2, criterion, padding=1).double()
    layer.load_state_dict({"weight": w, "bias": b})
    chosen = layer.selection(x)
    assert chosen.shape == (3, 2) and chosen.dtype == torch.long
    naive = naive_selection_neuron(x, w, b, 2, criterion, 1, 1)
    assert [set(row) for row in chosen.tolist()] == naive
    mask = layer.selection_mask(x)
    assert mask.shape == (3, 6)
    assert [set(m.nonzero().flatten().tolist()) for m in mask] == naive
    alive = layer(x).abs().amax(dim=(-2, -1)) > 0
    assert torch.equal(alive, mask)


def test_selection_with_full_k_selects_everything():
    x = torch.randn(2, 6, 5, 5)
    assert TopKConv2d(6, 4, 3, 6, padding=1).selection_mask(x).all()
    assert TopKLinear(7, 3, 7).selection_mask(torch.randn(2, 7)).all()


# ------------------------------------------------------------------ every layer on every device

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make,shape", [
    (lambda impl: TopKLinear(300, 9, 12, impl=impl), (4, 300)),
    (lambda impl: TopKLinear(300, 9, 12, positive_only=True, impl=impl), (4, 300)),
    (lambda impl: TopKConv2d(16, 8, 3, 3, "max", padding=1, impl=impl), (3, 16, 7, 7)),
    (lambda impl: TopKConv2d(16, 8, 3, 3, "sum", stride=2, impl=impl), (3, 16, 7, 7)),
    (lambda impl: TopKNeuronConv2d(16, 8, 3, 3, padding=1, impl=impl), (3, 16, 7, 7)),
])
def test_layers_forward_backward_on_device_match_the_cpu_reference(device, make, shape):
    torch.manual_seed(0)
    ref = make("reference").double()
    ours = make("auto").double().to(device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(*shape, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.to(device).requires_grad_()
    expected, got = ref(xa), ours(xb)
    assert got.device.type == device
    g = torch.randn_like(expected)
    expected.backward(g)
    got.backward(g.to(device))
    torch.testing.assert_close(got.cpu(), expected)
    torch.testing.assert_close(xb.grad.cpu(), xa.grad)
    torch.testing.assert_close(ours.weight.grad.cpu(), ref.weight.grad)
    torch.testing.assert_close(ours.selection_mask(xb.detach()).cpu(), ref.selection_mask(x))
