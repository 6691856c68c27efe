"""The fast kernels against impl="reference": larger float32 shapes, chunking edge cases, what
backward keeps alive, and the device they run on. Speed lives in benchmarks/, never here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from topkconv import functional as TF
from topkconv.layers import TopKConv2d, TopKLinear, TopKNeuronConv2d, dense_gradients
from topkconv.layers.kernels.selection import group_size, select_topk

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The two exact kernels: torch-level blocks (any device) and the numba CPU loops.
KERNELS = ["torch", "numba"]
# Every (device, kernel) pair that runs: the torch-level kernels also on CUDA when a GPU is present.
DEVICE_KERNELS = [("cpu", "torch"), ("cpu", "numba")] + ([("cuda", "torch")] if torch.cuda.is_available() else [])


def _rel_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    ours, ref = ours.detach(), ref.detach()
    scale = ref.abs().max().clamp_min(1e-12)
    err = float((ours - ref).abs().max() / scale)
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def _run(fn, inputs, grad_out_seed=1):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed)).to(out)
    out.backward(g)
    return out.detach(), [t.grad for t in leaves]


def _compare(fn_fast, fn_ref, inputs, tol=1e-5):
    out_f, grads_f = _run(fn_fast, inputs)
    out_r, grads_r = _run(fn_ref, inputs)
    _rel_close(out_f, out_r, tol)
    for gf, gr in zip(grads_f, grads_r):
        _rel_close(gf, gr, tol)


def _conv_inputs(batch, cin, cout, size, kernel=3, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, size, size, generator=g)
    w = torch.randn(cout, cin, kernel, kernel, generator=g) / (cin * kernel * kernel) ** 0.5
    b = torch.randn(cout, generator=g)
    return x.to(device), w.to(device), b.to(device)


def _linear_inputs(batch, fan_in, fan_out, seed=0, relu=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, fan_in, generator=g)
    x = x.relu() if relu else x
    w = torch.randn(fan_out, fan_in, generator=g) / fan_in ** 0.5
    b = torch.randn(fan_out, generator=g)
    return x.to(device), w.to(device), b.to(device)


# ------------------------------------------------------------------ float32 equivalence, larger shapes

@pytest.mark.parametrize("criterion", ["max", "sum"])
@pytest.mark.parametrize("batch,cin,cout,size,kernel,stride,padding,dilation,k", [
    (6, 48, 40, 10, 3, 1, 1, 1, 5),
    (3, 32, 24, 13, 3, 2, 1, 1, 7),
    (2, 20, 16, 12, 5, 1, 2, 2, 3),
    (4, 16, 8, 9, 1, 1, 0, 1, 4),
])
@pytest.mark.parametrize("device,impl", DEVICE_KERNELS)
def test_conv_float32_matches_reference(device, impl, criterion, batch, cin, cout, size, kernel, stride, padding,
                                        dilation, k):
    x, w, b = _conv_inputs(batch, cin, cout, size, kernel, device=device)
    _compare(lambda x, w, b: TF.topk_conv2d(x, w, b, k, criterion, stride, padding, dilation, impl=impl),
             lambda x, w, b: TF.topk_conv2d(x, w, b, k, criterion, stride, padding, dilation, impl="reference"),
             (x, w, b))


@pytest.mark.parametrize("positive_only", [False, True])
@pytest.mark.parametrize("batch,fan_in,fan_out,k", [(8, 3000, 64, 30), (5, 512, 10, 10), (3, 97, 33, 50)])
@pytest.mark.parametrize("device,impl", DEVICE_KERNELS)
def test_linear_float32_matches_reference(device, impl, positive_only, batch, fan_in, fan_out, k):
    # ReLU inputs only where the k largest products are all positive: with k above the number of
    # positive products the choice among the tied zeros, and so grad_x, is arbitrary (next test)
    x, w, b = _linear_inputs(batch, fan_in, fan_out, relu=not positive_only and k < fan_in // 4, device=device)
    _compare(lambda x, w, b: TF.topk_linear(x, w, b, k, positive_only, impl=impl),
             lambda x, w, b: TF.topk_linear(x, w, b, k, positive_only, impl="reference"), (x, w, b))


@pytest.mark.parametrize("impl", KERNELS)
def test_linear_ties_at_zero_give_the_same_output_and_weight_gradient(impl):
    # ReLU inputs, k above the number of positive products: the top k include tied zero products.
    # Which zeros are chosen is arbitrary, but it changes neither the output nor grad_w (x is 0 there).
    x, w, b = _linear_inputs(3, 97, 33, relu=True)
    out, grads = _run(lambda x, w, b: TF.topk_linear(x, w, b, 60, impl=impl), (x, w, b))
    ref, ref_grads = _run(lambda x, w, b: TF.topk_linear(x, w, b, 60, impl="reference"), (x, w, b))
    assert int((x > 0).sum(1).max()) < 60
    _rel_close(out, ref)
    _rel_close(grads[1], ref_grads[1])
    _rel_close(grads[2], ref_grads[2])


@pytest.mark.parametrize("impl", KERNELS)
def test_linear_positive_only_with_few_positive_products(impl):
    # most products negative: fewer than k positive ones, the rest of the top k are clamped zeros
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 40, generator=g)
    w = -torch.rand(6, 40, generator=g)
    w[:, :3] *= -1
    b = torch.zeros(6)
    _compare(lambda x, w, b: TF.topk_linear(x, w, b, 10, True, impl=impl),
             lambda x, w, b: TF.topk_linear(x, w, b, 10, True, impl="reference"), (x, w, b))
    out = TF.topk_linear(x, w, b, 10, True, impl=impl)
    torch.testing.assert_close(out, (x[:, None, :3] * w[None, :, :3]).sum(-1))


def test_select_topk_equals_torch_topk_on_every_group_size():
    g = torch.Generator().manual_seed(0)
    for n, k in [(1000, 7), (1000, 100), (257, 3), (64, 64)]:
        for gs in {1, 2, 3, group_size(n, k)}:
            width = gs * -(-n // gs)
            rows = torch.full((20, width), float("-inf"))
            rows[:, :n] = torch.randn(20, n, generator=g)
            values, idx = select_topk(rows, k, gs)
            want = rows.topk(k, dim=1).values
            torch.testing.assert_close(values.sort(1, descending=True).values, want)
            torch.testing.assert_close(rows.gather(1, idx), values)
            assert int(idx.max()) < n


def _rows_with_hard_cases(generator, width):
    """(name, rows) pairs that stress a selection: random rows, exact ties (ReLU zeros, a constant
    row), rows whose largest entries cluster in one region, and rows with infinities."""
    random = torch.randn(30, width, generator=generator)
    relu = random.relu()  # about half the entries exactly 0
    clustered = random.clone()
    clustered[:, width // 3:width // 3 + 400] += 10  # the top k all in one stretch
    infinite = random.clone()
    infinite[:, 7] = float("inf")
    infinite[:, 11] = float("-inf")
    return [("random", random), ("relu", relu), ("constant", torch.ones(4, width)),
            ("clustered", clustered), ("infinite", infinite), ("float64", random.double())]


# rows of 1000 take the bucket pass over the whole row, rows of 3000 the strided-group bound first
@pytest.mark.parametrize("width,k", [(1000, k) for k in (1, 2, 13, 250, 999, 1000)]
                         + [(3000, k) for k in (1, 2, 13, 250, 1500, 2999, 3000)])
def test_compiled_selection_equals_torch_topk(width, k):
    from topkconv.layers.kernels import selection as compiled

    assert (compiled.n_groups_for(width, k) > 1) == (width >= 2048)
    for name, rows in _rows_with_hard_cases(torch.Generator().manual_seed(k), width):
        idx = torch.empty(rows.shape[0], k, dtype=torch.int32)
        compiled.topk_rows(rows, k, idx)
        assert idx.unique(dim=1).shape == idx.shape or k == 1, name  # no position chosen twice
        assert all(len(set(r)) == k for r in idx.tolist()), name
        chosen = rows.gather(1, idx.long()).sort(1, descending=True).values
        torch.testing.assert_close(chosen, rows.topk(k, dim=1).values, msg=name)


def test_compiled_selection_orders_nan_first_like_torch():
    from topkconv.layers.kernels import selection as compiled

    rows = torch.randn(3, 500)
    rows[0, 5] = float("nan")
    rows[2, [1, 2]] = float("nan")
    idx = torch.empty(3, 4, dtype=torch.int32)
    compiled.topk_rows(rows, 4, idx)
    assert 5 in idx[0].tolist() and {1, 2} <= set(idx[2].tolist())


@pytest.mark.parametrize("width", [4, 8, 12], ids=["4", "8", "12"])
def test_the_four_positions_maps_loop_equals_the_one_position_loop_to_the_bit(width):
    """The max criterion's maps at stride 1 take four positions at once (``_plane_maps_3x3_fours``); its values
    and maxima must be the one-position loop's bit for bit, or a selection could change between the paths."""
    import numpy as np

    from topkconv.layers.kernels import numba_loops as compiled
    from topkconv.layers.kernels.jit import jit

    @jit
    def both(plane, geometry, w_i, fours, ones, best_fours, best_ones):
        best_fours[:] = -np.inf
        best_ones[:] = -np.inf
        compiled._plane_maps_3x3_fours(plane, geometry[6], geometry[7], w_i, fours, best_fours)
        compiled._plane_maps_3x3_ones(plane, geometry, w_i, ones, best_ones)

    rng = np.random.default_rng(width)
    plane = rng.standard_normal((width + 2, width + 2)).astype(np.float32)
    w_i = rng.standard_normal((9, 37)).astype(np.float32)  # 37 output channels: a vector tail too
    fours, ones = np.empty((width * width, 37), np.float32), np.empty((width * width, 37), np.float32)
    best_fours, best_ones = np.empty(37, np.float32), np.empty(37, np.float32)
    both(plane, (3, 3, 1, 1, 1, 1, width, width), w_i, fours, ones, best_fours, best_ones)
    assert np.array_equal(fours, ones) and np.array_equal(best_fours, best_ones)
    expected = sum(w_i[3 * dy + dx][None, :] * plane[dy:dy + width, dx:dx + width].reshape(-1, 1)
                   for dy in range(3) for dx in range(3))  # the naive formula, to rounding
    np.testing.assert_allclose(fours, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(best_fours, fours.max(0))


def test_auto_picks_the_compiled_loops_on_cpu_float(monkeypatch):
    from topkconv.layers.kernels import numba_loops as compiled

    calls = []
    for name in ("linear_forward", "linear_values", "conv_output", "conv_forward_whole"):
        original = getattr(compiled, name)
        monkeypatch.setattr(compiled, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    x, w, b = _linear_inputs(2, 50, 4)
    TF.topk_linear(x, w, b, 5)
    xc, wc, bc = _conv_inputs(2, 6, 4, 5)
    TF.topk_conv2d(xc, wc, bc, 2, "sum", 1, 1)
    # nothing needs a gradient: Dynamic-k's forward-only value; a small batch: the dense-order loops
    assert calls == ["linear_values", "conv_forward_whole"]
    calls.clear()
    with TF.memory_budget(64):  # too small for the whole batch, and k = 1 of 6 channels: the sparse router
        TF.topk_conv2d(xc, wc, bc, 1, "sum", 1, 1)
    assert set(calls) == {"conv_output"}  # one call per chunk of samples
    calls.clear()
    with TF.memory_budget(6000):  # k = 2 of 6, a large share: the dense-order loops (a sample's maps: 2,400
        TF.topk_conv2d(xc, wc, bc, 2, "sum", 1, 1)  # bytes), in one call: they never build the columns
    assert calls == ["conv_forward_whole"]
    calls.clear()
    TF.topk_linear(x, w, b, 5, impl="torch")
    TF.topk_linear(x.bfloat16(), w.bfloat16(), None, 5)  # auto: bfloat16 takes the torch-level kernel
    assert calls == []


@pytest.mark.parametrize("device", DEVICES)
def test_backend_table_picks_by_impl_and_inputs(device):
    from topkconv.layers.kernels import backends

    x = torch.randn(2, 3, device=device)
    on_cpu_float = device == "cpu" and backends.NUMBA_AVAILABLE
    assert backends.resolve("auto", x, x).name == ("numba" if on_cpu_float else "torch")
    assert backends.resolve("auto", x.half(), x.half()).name == "torch"
    assert backends.resolve("auto", x.float(), x.double()).name == "torch"  # mixed dtypes: no numba
    assert backends.resolve("torch", x, x).name == "torch"
    with pytest.raises(ValueError, match="impl must be one of"):
        backends.resolve("reference", x)  # the materialising formula is no kernel
    assert set(backends.AUTO_ORDER) <= set(backends.BACKENDS)


def test_numba_impl_rejects_what_it_cannot_run():
    x, w, b = _linear_inputs(2, 50, 4)
    with pytest.raises(ValueError, match="impl='numba'.*float16"):
        TF.topk_linear(x.half(), w.half(), None, 5, impl="numba")
    with pytest.raises(ValueError, match="impl='numba'"):
        TF.topk_linear(x.double(), w, None, 5, impl="numba")


# ------------------------------------------------------------------ chunking edge cases

@pytest.mark.parametrize("budget", [1, 3000, 1 << 30])
@pytest.mark.parametrize("device,impl", DEVICE_KERNELS)
def test_chunking_does_not_change_results(device, impl, budget):
    x, w, b = _conv_inputs(5, 12, 10, 7, device=device)
    xl, wl, bl = _linear_inputs(7, 300, 23, device=device)
    ref_conv = _run(lambda x, w, b: TF.topk_conv2d(x, w, b, 3, "max", 1, 1, impl="reference"), (x, w, b))
    ref_sum = _run(lambda x, w, b: TF.topk_conv2d(x, w, b, 3, "sum", 2, 0, impl="reference"), (x, w, b))
    ref_lin = _run(lambda x, w, b: TF.topk_linear(x, w, b, 9, impl="reference"), (xl, wl, bl))
    with TF.memory_budget(budget):
        conv = _run(lambda x, w, b: TF.topk_conv2d(x, w, b, 3, "max", 1, 1, impl=impl), (x, w, b))
        summed = _run(lambda x, w, b: TF.topk_conv2d(x, w, b, 3, "sum", 2, 0, impl=impl), (x, w, b))
        lin = _run(lambda x, w, b: TF.topk_linear(x, w, b, 9, impl=impl), (xl, wl, bl))
    for ours, ref in [(conv, ref_conv), (summed, ref_sum), (lin, ref_lin)]:
        _rel_close(ours[0], ref[0])
        for a, r in zip(ours[1], ref[1]):
            _rel_close(a, r)


def test_memory_budget_setting_and_errors():
    before = TF.get_memory_budget()
    with TF.memory_budget(1234):
        assert TF.get_memory_budget() == 1234
    assert TF.get_memory_budget() == before
    for bad in (0, -5, 1.5, True, "1MB"):
        with pytest.raises(ValueError, match="memory budget"):
            TF.set_memory_budget(bad)


@pytest.mark.parametrize("device,impl", DEVICE_KERNELS)
def test_batch_of_one_and_rows_not_dividing_blocks(device, impl):
    x, w, b = _linear_inputs(1, 1001, 37, seed=4, device=device)
    with TF.memory_budget(10_000):  # a few rows per block, the last block partial
        _compare(lambda x, w, b: TF.topk_linear(x, w, b, 11, impl=impl),
                 lambda x, w, b: TF.topk_linear(x, w, b, 11, impl="reference"), (x, w, b))
    xc, wc, bc = _conv_inputs(1, 9, 5, 6, device=device)
    _compare(lambda x, w, b: TF.topk_conv2d(x, w, b, 2, "max", 1, 1, impl=impl),
             lambda x, w, b: TF.topk_conv2d(x, w, b, 2, "max", 1, 1, impl="reference"), (xc, wc, bc))


# ------------------------------------------------------------------ what backward keeps

def _saved_sizes(fn, *inputs):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    leaves = [t.clone().requires_grad_() for t in inputs]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*leaves)
    out.sum().backward()  # the saved tensors must suffice for backward
    return sizes


@pytest.mark.parametrize("impl", KERNELS)
def test_conv_saves_no_channel_maps(impl):
    batch, cin, cout, size, k = 4, 16, 12, 6, 3
    x, w, b = _conv_inputs(batch, cin, cout, size)
    a_size = batch * cout * cin * size * size  # A, the maps the paper's formula builds
    for criterion in ("max", "sum"):
        fast = _saved_sizes(lambda x, w, b: TF.topk_conv2d(x, w, b, k, criterion, 1, 1, impl=impl), x, w, b)
        assert fast and max(fast) <= max(x.numel(), w.numel(), batch * cout * k)
        assert sum(fast) <= x.numel() + w.numel() + batch * cout * k
    # the check can fail: a graph that keeps A is seen
    keeps_a = _saved_sizes(lambda x, w, b: TF.channel_maps(x, w, 1, 1).square().sum(2) + b[:, None, None], x, w, b)
    assert max(keeps_a) >= a_size


@pytest.mark.parametrize("impl", KERNELS)
def test_linear_saves_no_products(impl):
    batch, fan_in, fan_out, k = 6, 200, 30, 5
    x, w, b = _linear_inputs(batch, fan_in, fan_out)
    fast = _saved_sizes(lambda x, w, b: TF.topk_linear(x, w, b, k, impl=impl), x, w, b)
    assert sum(fast) <= x.numel() + w.numel() + batch * fan_out * k
    keeps_products = _saved_sizes(lambda x, w, b: (x[:, None, :] * w).square().sum(2) + b, x, w, b)
    assert max(keeps_products) >= batch * fan_out * fan_in  # the check can fail


def test_tkc_neuron_saves_only_inputs_and_mask():
    x, w, b = _conv_inputs(4, 6, 10, 7)
    fast = _saved_sizes(lambda x, w, b: TF.topk_neuron_conv2d(x, w, b, 3, "max", 1, 1, impl="torch"), x, w, b)
    # the convolution keeps x and w; the masking keeps the (B, out, 1, 1) mask, never the output
    assert sorted(fast) == sorted([x.numel(), w.numel(), 4 * 10])


# ------------------------------------------------------------------ layers, BPDA and devices

def test_layers_default_to_the_fast_path_and_match_reference():
    torch.manual_seed(0)
    x = torch.randn(3, 8, 9, 9)
    for make in (lambda impl: TopKConv2d(8, 6, 3, 2, padding=1, impl=impl),
                 lambda impl: TopKConv2d(8, 6, 3, 2, "sum", stride=2, impl=impl),
                 lambda impl: TopKNeuronConv2d(8, 6, 3, 2, padding=1, impl=impl)):
        fast, ref = make("auto"), make("reference")
        ref.load_state_dict(fast.state_dict())
        _rel_close(fast(x), ref(x))
    lin, lin_ref = TopKLinear(40, 7, 4), TopKLinear(40, 7, 4, impl="reference")
    lin_ref.load_state_dict(lin.state_dict())
    xl = torch.randn(2, 5, 40)  # extra leading dims are kept
    assert lin(xl).shape == (2, 5, 7)
    _rel_close(lin(xl), lin_ref(xl))


@pytest.mark.parametrize("device,impl", DEVICE_KERNELS)
def test_bpda_gradients_are_the_dense_layers_on_the_fast_path(device, impl):
    x, w, b = _conv_inputs(2, 6, 5, 6, device=device)
    with dense_gradients():
        out, grads = _run(lambda x, w, b: TF.topk_conv2d(x, w, b, 2, "max", 1, 1, impl=impl), (x, w, b))
    _rel_close(out, TF.topk_conv2d(x, w, b, 2, "max", 1, 1, impl="reference"))
    _, dense_grads = _run(lambda x, w, b: F.conv2d(x, w, b, 1, 1), (x, w, b))
    for g, d in zip(grads, dense_grads):
        _rel_close(g, d)


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_stay_on_the_input_device(device):
    x, w, b = _conv_inputs(2, 8, 6, 7, device=device)
    xl, wl, bl = _linear_inputs(3, 120, 9, device=device)
    for fn, inputs in [(lambda x, w, b: TF.topk_conv2d(x, w, b, 2, "max", 1, 1, impl="torch"), (x, w, b)),
                       (lambda x, w, b: TF.topk_conv2d(x, w, b, 2, "sum", 1, 1, impl="torch"), (x, w, b)),
                       (lambda x, w, b: TF.topk_linear(x, w, b, 5, impl="torch"), (xl, wl, bl))]:
        out, grads = _run(fn, inputs)
        assert out.device.type == device and all(g.device.type == device for g in grads)


@pytest.mark.parametrize("device", DEVICES)  # CUDA joins the table whenever a GPU is present
def test_device_matches_cpu_reference(device):
    x, w, b = _conv_inputs(4, 32, 24, 9)
    for criterion in ("max", "sum"):
        out, grads = _run(lambda x, w, b: TF.topk_conv2d(x, w, b, 4, criterion, 1, 1, impl="torch"),
                          [t.to(device) for t in (x, w, b)])
        ref, ref_grads = _run(lambda x, w, b: TF.topk_conv2d(x, w, b, 4, criterion, 1, 1, impl="reference"),
                              (x, w, b))
        _rel_close(out.cpu(), ref, 1e-4)
        for g, r in zip(grads, ref_grads):
            _rel_close(g.cpu(), r, 1e-4)
    xl, wl, bl = _linear_inputs(6, 2000, 40)
    out, grads = _run(lambda x, w, b: TF.topk_linear(x, w, b, 20, impl="torch"), [t.to(device) for t in (xl, wl, bl)])
    ref, ref_grads = _run(lambda x, w, b: TF.topk_linear(x, w, b, 20, impl="reference"), (xl, wl, bl))
    _rel_close(out.cpu(), ref, 1e-4)
    for g, r in zip(grads, ref_grads):
        _rel_close(g.cpu(), r, 1e-4)


def _forbid_host_transfers(monkeypatch):
    """Make every Python-level way of moving tensor data to the host raise."""
    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name}() called: data moved to the host")
        return method
    for name in ("numpy", "item", "tolist", "cpu", "__array__"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_level_kernels_never_move_data_to_the_host(monkeypatch, device):
    # The torch-level backend ("torch") must stay in torch: it is what serves CUDA. Only the numba
    # backend may view tensors as numpy arrays (layers/kernels/bridge.py), which the second half shows.
    x, w, b = _conv_inputs(3, 8, 6, 7, device=device)
    xl, wl, bl = _linear_inputs(3, 300, 9, device=device)
    cases = [(lambda x, w, b: TF.topk_conv2d(x, w, b, 2, "max", 1, 1, impl="torch"), (x, w, b)),
             (lambda x, w, b: TF.topk_conv2d(x, w, b, 2, "sum", 2, 0, impl="torch"), (x, w, b)),
             (lambda x, w, b: TF.topk_linear(x, w, b, 5, impl="torch"), (xl, wl, bl)),
             (lambda x, w, b: TF.topk_linear(x, w, b, 5, True, impl="torch"), (xl, wl, bl))]
    leaves = [[t.detach().clone().requires_grad_() for t in inputs] for _, inputs in cases]
    grads_out = [torch.randn_like(fn(*inputs)) for fn, inputs in cases]
    _forbid_host_transfers(monkeypatch)
    for (fn, _), inputs, g in zip(cases, leaves, grads_out):
        fn(*inputs).backward(g)  # forward and backward run with every host transfer forbidden
        assert all(t.grad is not None for t in inputs)
    if device == "cpu":  # the check can fail: the numba backend converts, and is stopped
        with pytest.raises(AssertionError, match="Tensor.numpy"):
            TF.topk_linear(xl, wl, bl, 5, impl="numba")


@pytest.mark.parametrize("threads", [2, 3])
def test_compiled_loops_split_over_threads_give_the_same_results(threads):
    # the numba entry points split work over torch.get_num_threads() threads; each output entry
    # must still be written by exactly one of them
    x, w, b = _conv_inputs(5, 12, 10, 7)
    xl, wl, bl = _linear_inputs(7, 300, 23)
    cases = [(lambda x, w, b: TF.topk_conv2d(x, w, b, 3, "max", 1, 1, impl="numba"), (x, w, b)),
             (lambda x, w, b: TF.topk_conv2d(x, w, b, 3, "sum", 2, 0, impl="numba"), (x, w, b)),
             (lambda x, w, b: TF.topk_linear(x, w, b, 9, impl="numba"), (xl, wl, bl))]
    single = [_run(fn, inputs) for fn, inputs in cases]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        split = [_run(fn, inputs) for fn, inputs in cases]
    finally:
        torch.set_num_threads(previous)
    for (out_1, grads_1), (out_n, grads_n) in zip(single, split):
        _rel_close(out_n, out_1, 1e-6)
        for g1, gn in zip(grads_1, grads_n):
            _rel_close(gn, g1, 1e-6)


@pytest.mark.parametrize("device,impl", DEVICE_KERNELS)
def test_empty_batch_gives_empty_outputs_and_gradients(device, impl):
    x, w, b = _conv_inputs(0, 4, 3, 5, device=device)
    xl, wl, bl = _linear_inputs(0, 20, 5, device=device)
    for fn, inputs, shape in [
            (lambda x, w, b: TF.topk_conv2d(x, w, b, 2, "max", 1, 1, impl=impl), (x, w, b), (0, 3, 5, 5)),
            (lambda x, w, b: TF.topk_conv2d(x, w, b, 2, "sum", 1, 1, impl=impl), (x, w, b), (0, 3, 5, 5)),
            (lambda x, w, b: TF.topk_linear(x, w, b, 3, impl=impl), (xl, wl, bl), (0, 5))]:
        out, grads = _run(fn, inputs)
        assert out.shape == shape
        assert grads[0].shape == inputs[0].shape
        assert torch.count_nonzero(grads[1]) == 0 and torch.count_nonzero(grads[2]) == 0


def test_the_install_time_warm_up_runs_every_numba_path():
    from topkconv.layers.kernels import warmup
    from topkconv.layers.kernels.jit import AVAILABLE

    assert AVAILABLE, "numba is a dependency: the CPU kernels must be compiled, not the Python fallbacks"
    assert warmup.compile_kernels() >= 0.0
