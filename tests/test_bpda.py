"""The backward modes of the routing layers: dense and soft BPDA (layers/bpda.py).

Soft mode keeps every layer's forward value exact and back-propagates through a sigmoid relaxation
of its top-k selection. Checked here against the relaxation written out by hand, against the exact
gradient as tau -> 0 (float64 inputs without near-ties), and for its mode switching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference import seeded_without_ties
from topkconv import functional as TF
from topkconv.layers.bpda import DEFAULT_TAU_FRACTION
from topkconv.layers import (StochasticActivationPruning, TopKConv2d, TopKLinear, TopKNeuronConv2d, dense_gradients,
                             gradient_mode, soft_gradients)

IMPLS = ["reference", "auto", "torch"]


def _linear_case(positive_only=False):
    def make(g):
        return (torch.randn(3, 14, generator=g, dtype=torch.float64),
                torch.randn(5, 14, generator=g, dtype=torch.float64))
    def scores(x, w):
        products = x[:, None, :] * w[None]
        return products.clamp(min=0) if positive_only else products
    x, w = seeded_without_ties(make, scores, 4)
    layer = TopKLinear(14, 5, 4, positive_only=positive_only).double()
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer, x


def _conv_case(criterion):
    def make(g):
        return (torch.randn(2, 6, 6, 6, generator=g, dtype=torch.float64),
                torch.randn(4, 6, 3, 3, generator=g, dtype=torch.float64))
    x, w = seeded_without_ties(make, lambda x, w: TF.channel_scores(TF.channel_maps(x, w, 1, 1), criterion), 2)
    layer = TopKConv2d(6, 4, 3, 2, criterion, padding=1).double()
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer, x


def _neuron_case(criterion):
    def make(g):
        return (torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64),
                torch.randn(7, 4, 3, 3, generator=g, dtype=torch.float64),
                torch.randn(7, generator=g, dtype=torch.float64))
    x, w, b = seeded_without_ties(make, lambda x, w, b: TF.channel_scores(F.conv2d(x, w, b, 1, 1), criterion), 3)
    layer = TopKNeuronConv2d(4, 7, 3, 3, criterion, padding=1).double()
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    return layer, x


CASES = {
    "linear": lambda: _linear_case(),
    "linear-positive": lambda: _linear_case(positive_only=True),
    "conv-max": lambda: _conv_case("max"),
    "conv-sum": lambda: _conv_case("sum"),
    "neuron-max": lambda: _neuron_case("max"),
    "neuron-sum": lambda: _neuron_case("sum"),
}


def _gradients(layer, x, mode=None):
    """(output, input gradient, weight gradient) of ``layer`` on ``x`` for a fixed upstream gradient."""
    layer.zero_grad()
    xg = x.clone().requires_grad_()
    with mode if mode is not None else torch.enable_grad():
        out = layer(xg)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype))
    return out.detach(), xg.grad, layer.weight.grad.clone()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_soft_mode_keeps_the_exact_forward_value(case, impl):
    layer, x = CASES[case]()
    layer.impl = impl
    exact, _, _ = _gradients(layer, x)
    for tau in (None, 1e-6, 10.0):
        soft, _, _ = _gradients(layer, x, soft_gradients(tau))
        torch.testing.assert_close(soft, exact, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_soft_gradient_tends_to_the_exact_gradient_as_tau_vanishes(case):
    layer, x = CASES[case]()
    _, exact_x, exact_w = _gradients(layer, x)
    _, soft_x, soft_w = _gradients(layer, x, soft_gradients(1e-6))
    torch.testing.assert_close(soft_x, exact_x)
    torch.testing.assert_close(soft_w, exact_w)
    # ... and a wide relaxation does not: the selection then really is smoothed
    _, wide_x, _ = _gradients(layer, x, soft_gradients(10.0))
    assert not torch.allclose(wide_x, exact_x, rtol=1e-3, atol=1e-6)
    # the default temperature sits in between: neither exact nor dense
    _, default_x, _ = _gradients(layer, x, soft_gradients())
    _, dense_x, _ = _gradients(layer, x, dense_gradients())
    assert not torch.allclose(default_x, exact_x, rtol=1e-3, atol=1e-6)
    assert not torch.allclose(default_x, dense_x, rtol=1e-3, atol=1e-6)
    assert torch.isfinite(default_x).all()


def _sigmoid_gate(scores, k, tau):
    """The relaxation as documented: threshold halfway between the k-th and (k+1)-th score, held fixed."""
    top = scores.detach().sort(dim=-1, descending=True).values
    threshold = (top[..., k - 1:k] + top[..., k:k + 1]) / 2
    return torch.sigmoid((scores - threshold) / tau)


@pytest.mark.parametrize("positive_only", [False, True])
@pytest.mark.parametrize("tau", [0.05, 0.7, None])
def test_soft_linear_gradients_are_those_of_the_written_out_relaxation(tau, positive_only):
    linear, x = _linear_case(positive_only)
    xa, wa = x.clone().requires_grad_(), linear.weight.detach().clone().requires_grad_()
    products = xa[:, None, :] * wa[None]
    if positive_only:
        products = torch.where(products > 0, products, torch.zeros_like(products))
    temperature = tau if tau is not None else DEFAULT_TAU_FRACTION * products.detach().std(dim=-1, keepdim=True)
    by_hand = (_sigmoid_gate(products, 4, temperature) * products).sum(-1) + linear.bias.detach()
    g = torch.randn(by_hand.shape, generator=torch.Generator().manual_seed(2), dtype=by_hand.dtype)
    by_hand.backward(g)
    xb = x.clone().requires_grad_()
    linear.zero_grad()
    with soft_gradients(tau):
        linear(xb).backward(g)
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(linear.weight.grad, wa.grad)


@pytest.mark.parametrize("tau", [0.05, 0.7])
def test_soft_conv_gradients_are_those_of_the_written_out_relaxation(tau):

    conv, x = _conv_case("max")
    xa = x.clone().requires_grad_()
    maps = TF.channel_maps(xa, conv.weight.detach(), 1, 1)
    gate = _sigmoid_gate(TF.channel_scores(maps, "max"), 2, tau)
    by_hand = (maps * gate[..., None, None]).sum(2) + conv.bias.detach().view(1, -1, 1, 1)
    by_hand.backward(torch.ones_like(by_hand))
    xb = x.clone().requires_grad_()
    with soft_gradients(tau):
        conv(xb).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)

    neuron, x = _neuron_case("sum")
    xa = x.clone().requires_grad_()
    dense = F.conv2d(xa, neuron.weight.detach(), neuron.bias.detach(), 1, 1)
    by_hand = dense * _sigmoid_gate(TF.channel_scores(dense, "sum"), 3, tau)[..., None, None]
    by_hand.backward(torch.ones_like(by_hand))
    xb = x.clone().requires_grad_()
    with soft_gradients(tau):
        neuron(xb).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)


def test_soft_gradient_reaches_near_selected_inputs():
    # exact gradients reach only selected products; the soft ones reach unselected ones too
    linear, x = _linear_case()
    _, _, exact_w = _gradients(linear, x[:1])
    _, _, soft_w = _gradients(linear, x[:1], soft_gradients())
    assert int((exact_w != 0).sum()) == 5 * 4
    assert int((soft_w != 0).sum()) > 5 * 4


def test_backward_outside_the_block_uses_the_forward_time_temperature():
    # the soft surrogates are recomputed chunk by chunk during backward: they must not read the
    # mode or tau at that time
    layer, x = _conv_case("sum")
    _, exact_x, _ = _gradients(layer, x)
    xg = x.clone().requires_grad_()
    with soft_gradients(1e-6):
        out = layer(xg)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype))
    torch.testing.assert_close(xg.grad, exact_x)


@pytest.mark.parametrize("case", ["linear", "conv-max"])
def test_soft_chunking_does_not_change_gradients(case):
    layer, x = CASES[case]()
    _, whole, _ = _gradients(layer, x, soft_gradients(0.3))
    with TF.memory_budget(1):  # one sample per checkpointed chunk
        _, chunked, _ = _gradients(layer, x, soft_gradients(0.3))
    torch.testing.assert_close(chunked, whole)


def test_modes_nest_and_restore_even_after_an_exception():
    assert gradient_mode() == "exact"
    with soft_gradients(0.5):
        assert gradient_mode() == "soft"
        with dense_gradients():
            assert gradient_mode() == "dense"
            with dense_gradients(False):
                assert gradient_mode() == "exact"
            assert gradient_mode() == "dense"
        assert gradient_mode() == "soft"
        with pytest.raises(RuntimeError):
            with dense_gradients():
                raise RuntimeError("boom")
        assert gradient_mode() == "soft"
    assert gradient_mode() == "exact"
    with pytest.raises(KeyError):
        with soft_gradients():
            raise KeyError("boom")
    assert gradient_mode() == "exact"


@pytest.mark.parametrize("tau", [0, -1.0, float("nan"), float("inf"), "0.1", True])
def test_bad_tau_raises_value_error_naming_it(tau):
    with pytest.raises(ValueError, match=r"^tau\b"):
        soft_gradients(tau)


def test_sap_passes_the_identity_gradient_in_both_bpda_modes():
    h = torch.relu(torch.randn(3, 20)) + 0.1
    sap = StochasticActivationPruning(0.5).eval()
    for mode in (dense_gradients(), soft_gradients()):
        hg = h.clone().requires_grad_()
        with mode:
            sap(hg).sum().backward()
        torch.testing.assert_close(hg.grad, torch.ones_like(h))


def test_soft_mode_in_a_model_reaches_every_routing_layer():
    torch.manual_seed(0)
    model = nn.Sequential(TopKConv2d(3, 6, 3, 2, padding=1), nn.ReLU(), TopKNeuronConv2d(6, 6, 3, 2, padding=1),
                          nn.Flatten(), TopKLinear(6 * 5 * 5, 4, 10)).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    grads = {}
    for name, mode in [("exact", None), ("soft", soft_gradients()), ("dense", dense_gradients())]:
        grads[name] = _gradients(_Wrap(model), x, mode)
    torch.testing.assert_close(grads["soft"][0], grads["exact"][0])
    assert not torch.allclose(grads["soft"][1], grads["exact"][1])
    assert not torch.allclose(grads["soft"][1], grads["dense"][1])


class _Wrap(nn.Module):
    """A model whose ``weight`` is its first layer's, for :func:`_gradients`."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.weight = model[0].weight

    def forward(self, x):
        return self.model(x)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("case", CASES)
def test_soft_gradients_on_a_device_match_the_cpu(case, device):
    layer, x = CASES[case]()
    _, cpu_x, cpu_w = _gradients(layer, x, soft_gradients())
    out, dev_x, dev_w = _gradients(layer.to(device), x.to(device), soft_gradients())
    assert out.device.type == device
    torch.testing.assert_close(dev_x.cpu(), cpu_x)
    torch.testing.assert_close(dev_w.cpu(), cpu_w)
