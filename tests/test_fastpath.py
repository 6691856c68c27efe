"""The fast paths for small problems and for forward-only calls, against the reference formula and
against the general (chunked) kernels: outputs, selections, gradients, under inference_mode too; the
tie rule they share; the impl vocabulary."""

from __future__ import annotations

import warnings

import pytest
import torch

from topkconv import functional as TF
from topkconv.layers import IMPLS, TopKConv2d, TopKLinear, TopKNeuronConv2d
from topkconv.layers.kernels import backends, bridge, conv
from topkconv.layers.kernels.selection import bounded_wins, guided_wins

pytestmark = pytest.mark.skipif(not backends.NUMBA_AVAILABLE, reason="the fast paths are the numba backend's")

_TINY_BUDGET = 64  # bytes: no whole batch, no sample fits: the sparse router of the chunked driver


def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    out.backward(g)
    return out.detach(), [t.grad for t in inputs]


def _conv_inputs(dtype, batch=5, cin=12, cout=10, size=5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cin, size, size, generator=g, dtype=dtype).relu()
    return x, torch.randn(cout, cin, 3, 3, generator=g, dtype=dtype), torch.randn(cout, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("criterion", ["max", "sum"])
@pytest.mark.parametrize("geometry", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
@pytest.mark.parametrize("k", [2, 4])
def test_dense_loops_match_the_sparse_router_and_reference(dtype, criterion, geometry, k):
    # k = 2 of 12 channels: the dense-order loops for the whole batch, the sparse router when the batch
    # does not fit; k = 4: the dense-order loops both times (then in chunks of samples).
    x, w, b = _conv_inputs(dtype)
    stride, padding, dilation = geometry
    # one byte short of the whole batch's columns: one sample's columns and maps still fit
    short = x.shape[0] * conv._column_bytes(x, w, stride, padding, dilation) - 1
    assert conv.dense_loops_win(x, w, k, stride, padding, dilation)
    with TF.memory_budget(short):
        assert conv.dense_loops_win(x, w, k, stride, padding, dilation) == (k == 4)
    fn = lambda impl: lambda x, w, b: TF.topk_conv2d(x, w, b, k, criterion, stride, padding, dilation, impl=impl)  # noqa: E731
    whole = _grads(fn("numba"), x, w, b)
    with TF.memory_budget(short):
        chunked = _grads(fn("numba"), x, w, b)
    reference = _grads(fn("reference"), x, w, b)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for other in (chunked, reference):
        torch.testing.assert_close(whole[0], other[0], **tol)
        for got, want in zip(whole[1], other[1]):
            torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("criterion", ["max", "sum"])
@pytest.mark.parametrize("kernel", [(1, 1), (2, 3), (5, 5)], ids=["1x1", "2x3", "5x5"])
def test_dense_loops_match_the_reference_for_kernels_other_than_3x3(kernel, criterion):
    # 3 x 3 kernels take the taps' vector path (simd.taps_block_3x3); every other kernel the masked-weight loops.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 6, 6, 6, generator=g, dtype=torch.float64)
    w = torch.randn(5, 6, *kernel, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    assert conv.dense_loops_win(x, w, 3, 1, 1, 1)
    fn = lambda impl: lambda x, w, b: TF.topk_conv2d(x, w, b, 3, criterion, 1, 1, impl=impl)  # noqa: E731
    got, want = _grads(fn("numba"), x, w, b), _grads(fn("reference"), x, w, b)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    for got_grad, want_grad in zip(got[1], want[1]):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("criterion", ["max", "sum"])
def test_dense_loops_gradcheck(criterion):
    x, w, b = _conv_inputs(torch.float64, batch=2, cin=6, cout=4, size=4)
    fn = lambda x, w, b: TF.topk_conv2d(x, w, b, 3, criterion, 1, 1, impl="numba")  # noqa: E731
    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in (x, w, b)])


@pytest.mark.parametrize("criterion", ["max", "sum"])
def test_dense_loops_select_as_the_sparse_router(criterion):
    x, w, _ = _conv_inputs(torch.float64)
    whole = TF.topk_conv2d_selection(x, w, 2, criterion, 1, 1, impl="numba").sort(-1).values
    with TF.memory_budget(_TINY_BUDGET):  # k = 2 of 12: the sparse router
        chunked = TF.topk_conv2d_selection(x, w, 2, criterion, 1, 1, impl="numba").sort(-1).values
    reference = TF.topk_conv2d_selection(x, w, 2, criterion, 1, 1, impl="reference").sort(-1).values
    assert torch.equal(whole, chunked) and torch.equal(whole, reference)


def test_dense_loops_give_the_same_numbers_on_two_threads():
    x, w, b = _conv_inputs(torch.float32, batch=16, cin=32, cout=32, size=6)
    fn = lambda x, w, b: TF.topk_conv2d(x, w, b, 8, "max", 1, 1, impl="numba")  # noqa: E731
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads(fn, x, w, b)
        torch.set_num_threads(2)
        two = _grads(fn, x, w, b)
    finally:
        torch.set_num_threads(before)
    assert x.numel() * 9 * 32 >= bridge.MIN_THREADED_WORK  # big enough to be split
    assert torch.equal(one[0], two[0]) and all(torch.equal(p, q) for p, q in zip(one[1], two[1]))


@pytest.mark.parametrize("threads, total", [(2, 10), (3, 10), (3, 2), (4, 7)])
def test_split_covers_every_index_once_with_the_first_piece_on_the_calling_thread(threads, total):
    import threading

    seen, caller = [], threading.get_ident()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        bridge.split(total, lambda a, b: seen.append((a, b, threading.get_ident())))
    finally:
        torch.set_num_threads(before)
    assert sorted(i for a, b, _ in seen for i in range(a, b)) == list(range(total))
    assert [a for a, _, ident in seen if ident == caller] == [0]  # the pool's threads run the others
    assert len(seen) == min(threads, total)


def test_routed_conv_pieces_run_on_numba_threads_or_the_pool_with_the_same_numbers(monkeypatch):
    """At 2 threads the dense-order conv loops run on numba's threads (bridge.run_pieces); under a threading layer
    that is not thread-safe they go back to the pool (split). Either way, the same pieces and the same bits."""
    x, w, b = _conv_inputs(torch.float32, batch=8, cin=32, cout=32, size=8)
    fn = lambda x, w, b: TF.topk_conv2d(x, w, b, 8, "max", 1, 1, impl="numba")  # noqa: E731
    pooled = []
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        on_numba = _grads(fn, x, w, b)
        assert bridge._layer_safe in (True, False)   # a launch happened and its layer was judged
        original = bridge.split
        monkeypatch.setattr(bridge, "_layer_safe", False)
        monkeypatch.setattr(bridge, "split", lambda total, run, work=None: (pooled.append(total),
                                                                              original(total, run, work)))
        on_pool = _grads(fn, x, w, b)
    finally:
        torch.set_num_threads(before)
    assert len(pooled) == 3   # the forward and both gradients
    assert torch.equal(on_numba[0], on_pool[0]) and all(torch.equal(p, q) for p, q in zip(on_numba[1], on_pool[1]))


def test_split_raises_a_pieces_error_after_every_piece_has_ended():
    ended = []

    def run(a, b):
        if a > 0:
            raise RuntimeError(f"piece {a}")
        ended.append(a)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(RuntimeError, match="piece"):
            bridge.split(10, run)
    finally:
        torch.set_num_threads(before)
    assert ended == [0]


@pytest.mark.parametrize("positive_only", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fan_in, k", [(96, 7), (96, 40), (2100, 2100)], ids=["guided", "guided k=40", "general"])
def test_guided_linear_matches_reference_and_the_general_loop(fan_in, k, positive_only, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, fan_in, generator=g, dtype=dtype)  # no zero inputs: no tied products whose gradient counts
    w, b = torch.randn(20, fan_in, generator=g, dtype=dtype), torch.randn(20, generator=g, dtype=dtype)
    if k == fan_in:  # every product summed: small integers keep 2,100-term float32 sums exact in any order
        x = x.sign() * torch.randint(1, 4, x.shape, generator=g)
        w = torch.randint(-3, 4, w.shape, generator=g).to(dtype)
    assert guided_wins(fan_in, k) == (fan_in < 2048) and not bounded_wins(fan_in, k)  # k = fan_in: the general loop
    fn = lambda impl: lambda x, w, b: TF.topk_linear(x, w, b, k, positive_only, impl=impl)  # noqa: E731
    fast, reference = _grads(fn("numba"), x, w, b), _grads(fn("reference"), x, w, b)
    torch.testing.assert_close(fast[0], reference[0])
    for got, want in zip(fast[1], reference[1]):
        torch.testing.assert_close(got, want)


def test_guided_linear_gradcheck():
    g = torch.Generator().manual_seed(4)
    inputs = [torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_() for shape in ((6, 30), (5, 30), (5,))]
    assert torch.autograd.gradcheck(lambda x, w, b: TF.topk_linear(x, w, b, 4, impl="numba"), inputs)


def _wide_rows(dtype, width=2304, batch=40):
    """Rows for the bounded wide-row path: the previous rows' k-th values bound each row from below; rows far
    above that bound (x 100), far below it (x 0.01: the bound keeps fewer than k products), a NaN and an
    infinity (no bound) sit among ordinary ones."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(batch, width, generator=g, dtype=dtype)
    x[7] *= 100
    x[8] *= 0.01
    x[9] *= 0.01
    return x, torch.randn(6, width, generator=g, dtype=dtype), torch.randn(6, generator=g, dtype=dtype)


@pytest.mark.parametrize("positive_only", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bounded_wide_linear_matches_reference(positive_only, dtype):
    x, w, b = _wide_rows(dtype)
    for k in (13, 40):
        assert bounded_wins(x.shape[1], k) and not guided_wins(x.shape[1], k)
        fn = lambda impl: lambda x, w, b: TF.topk_linear(x, w, b, k, positive_only, impl=impl)  # noqa: E731
        fast, reference = _grads(fn("numba"), x, w, b), _grads(fn("reference"), x, w, b)
        torch.testing.assert_close(fast[0], reference[0])
        for got, want in zip(fast[1], reference[1]):
            torch.testing.assert_close(got, want)
        chosen = TF.topk_linear_selection(x, w, k, positive_only, impl="numba").sort(-1).values
        products = (x[:, None, :] * w[None]).clamp_min(0 if positive_only else -float("inf"))
        assert torch.equal(chosen, products.topk(k, dim=-1).indices.int().sort(-1).values)


def test_bounded_wide_linear_nan_inf_and_ties():
    x, w, _ = _wide_rows(torch.float32)
    x[12, 100] = float("nan")
    x[20, 5] = float("inf")
    x[30] = 1.0
    w.copy_(torch.rand(w.shape, generator=torch.Generator().manual_seed(9)) + 0.1)  # in [0.1, 1.1): row 30's
    #                                                                       products are w itself
    w[2, :50] = 2.0                             # 50 tied products at the top of row (30, 2)
    out = TF.topk_linear(x, w, None, 40, impl="numba")
    want = TF.topk_linear(x, w, None, 40, impl="reference")
    assert torch.isnan(out[12]).all() and torch.isnan(want[12]).all()
    assert torch.equal(torch.isinf(out), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(out[finite], want[finite])
    assert out[30, 2] == 80.0                   # 40 of the 50 tied 2s


def test_bounded_wide_linear_gradcheck():
    g = torch.Generator().manual_seed(8)
    shapes = ((5, 2100), (3, 2100), (3,))
    inputs = [torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_() for shape in shapes]
    assert bounded_wins(2100, 20)
    assert torch.autograd.gradcheck(lambda x, w, b: TF.topk_linear(x, w, b, 20, impl="numba"), inputs, fast_mode=True)


def test_ties_at_the_kth_value_keep_the_first_positions():
    # Row 0: three products of 2, then zeros: k = 5 takes the 2s and the first two zeros.
    x = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]])
    w = torch.full((1, 8), 2.0)
    chosen = TF.topk_linear_selection(x, w, 5, impl="numba")[0, 0].sort().values
    assert chosen.tolist() == [0, 1, 2, 3, 5]
    scores_row = torch.tensor([[3.0, 1.0, 3.0, 1.0, 1.0, 0.0]])  # conv rows share the rule
    positions = torch.arange(6, dtype=torch.int32).numpy()
    chosen = torch.empty(3, dtype=torch.int32)
    from topkconv.layers.kernels.selection import first_k_largest
    total, kth = numba_jit_first_k(first_k_largest, scores_row[0].numpy(), positions, 3, chosen.numpy())
    assert chosen.tolist() == [0, 1, 2] and total == 7.0 and kth == 1.0


def numba_jit_first_k(fn, row, positions, k, chosen):
    """Run the inlined selection helper from a jitted caller (it is not callable from Python)."""
    import numpy as np

    from topkconv.layers.kernels.jit import jit

    @jit
    def call(row, positions, k, values, keys, chosen):
        return fn(row, positions, row.shape[0], k, values, keys, chosen)

    keys = np.empty(row.shape[0], np.int32 if row.itemsize == 4 else np.int64)  # the floats' width
    return call(row, positions, k, np.empty_like(row), keys, chosen)


def test_nan_ranks_first_as_in_torch_topk():
    x = torch.ones(2, 8)
    x[1, 5] = float("nan")
    w = torch.arange(8.0).unsqueeze(0)
    chosen = TF.topk_linear_selection(x, w, 2, impl="numba")
    assert set(chosen[0, 0].tolist()) == {6, 7} and 5 in chosen[1, 0].tolist()
    assert torch.isnan(TF.topk_linear(x, w, None, 2, impl="numba")[1, 0])


def _saved_nothing(layer, x):
    with torch.inference_mode():
        out = layer(x)
    assert out.grad_fn is None and not out.requires_grad
    return out


@pytest.mark.parametrize("make", [
    lambda impl: TopKConv2d(12, 10, 3, 4, "max", padding=1, impl=impl),
    lambda impl: TopKConv2d(12, 10, 3, 4, "sum", padding=1, impl=impl),
    lambda impl: TopKNeuronConv2d(12, 10, 3, 4, padding=1, impl=impl),
    lambda impl: torch.nn.Sequential(torch.nn.Flatten(), TopKLinear(12 * 25, 10, 6, impl=impl)),
], ids=["topkconv-max", "topkconv-sum", "tkc-neuron", "topklinear"])
def test_forward_only_calls_match_and_build_no_graph(make, monkeypatch):
    torch.manual_seed(0)
    layer, reference = make("auto"), make("reference")
    reference.load_state_dict(layer.state_dict())
    x, _, _ = _conv_inputs(torch.float32)
    with torch.no_grad():
        want = reference(x)
    graph = layer(x)  # grad mode on: the autograd Function
    applied = []
    monkeypatch.setattr(torch.autograd.Function, "apply", classmethod(lambda cls, *a: applied.append(cls) or None))
    got = _saved_nothing(layer, x)
    assert applied == []  # no autograd Function under inference_mode
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, graph.detach(), rtol=0, atol=0)


def test_impl_names_are_one_list_and_fast_is_deprecated():
    assert IMPLS == ("auto", "numba", "torch", "reference")
    assert TF.IMPLS == IMPLS and set(backends.BACKENDS) == set(IMPLS) - {"auto", "reference"}
    with pytest.warns(DeprecationWarning, match="'fast' is deprecated; use impl='torch'"):
        layer = TopKLinear(30, 4, 3, impl="fast")
    assert layer.impl == "torch"
    x = torch.randn(3, 30)
    with pytest.warns(DeprecationWarning):
        old = TF.topk_linear(x, layer.weight, layer.bias, 3, impl="fast")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns about nothing
        new = TF.topk_linear(x, layer.weight, layer.bias, 3, impl="torch")
    assert torch.equal(old, new)
    with pytest.raises(ValueError, match="impl must be one of"):
        TopKConv2d(4, 4, 3, 2, impl="fastest")


def test_numba_backend_runs_its_own_loops_backward_too(monkeypatch):
    # Each of the backend's four operations is the compiled one (a backend that silently fell back to
    # the torch-level backward would still pass every value test).
    from topkconv.layers.kernels import numba_loops

    calls = []
    for name in ("linear_forward", "linear_backward", "conv_forward_whole", "conv_backward_whole"):
        original = getattr(numba_loops, name)
        monkeypatch.setattr(numba_loops, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    x, w, b = (t.requires_grad_() for t in _conv_inputs(torch.float32))
    TF.topk_conv2d(x, w, b, 4, "max", 1, 1).sum().backward()
    xl = torch.randn(4, 30, requires_grad=True)
    TF.topk_linear(xl, torch.randn(5, 30, requires_grad=True), None, 3).sum().backward()
    assert calls == ["conv_forward_whole", "conv_backward_whole", "linear_forward", "linear_backward"]


def _columns_case(name, dtype):
    g = torch.Generator().manual_seed(11)
    scores = torch.randn(12, 9, generator=g, dtype=dtype)
    if name == "ties":  # a few distinct values: ties at the k-th in most columns
        scores = torch.randint(0, 3, (12, 9), generator=g).to(dtype)
    elif name == "many-columns":  # ties over 37 columns
        scores = torch.randint(0, 3, (12, 37), generator=g).to(dtype)
    elif name == "many-rows":  # 150 rows: each column's chosen rows in three 64-bit words
        scores = torch.randint(0, 5, (150, 9), generator=g).to(dtype)
    elif name == "specials":
        scores[2, 0], scores[7, 1], scores[3, 2], scores[5, 3] = float("nan"), float("inf"), -float("inf"), -0.0
        scores[:, 4] = 0.0
        scores[::2, 5] = -0.0  # -0.0 and 0.0 tie
        scores[:, 6] = -float("inf")
    return scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 5, 12])
@pytest.mark.parametrize("name", ["random", "ties", "specials", "many-columns", "many-rows"])
def test_column_selection_picks_what_first_k_largest_picks_per_column(name, k, dtype):
    # The conv loops select every output channel's k input channels at once, down the columns of an
    # (in, out) score array; each column must get exactly first_k_largest's choice for that row.
    import numpy as np

    from topkconv.layers.kernels.jit import jit
    from topkconv.layers.kernels.selection import (first_k_largest, first_k_largest_down, key_dtype, ordered_keys,
                                                   row_bits_words)

    scores = _columns_case(name, dtype).numpy()
    keys_type = key_dtype(torch.from_numpy(scores))

    @jit
    def down(scores, k, keys_type):
        rows, columns = scores.shape
        keys = np.empty((rows, columns), keys_type)
        for i in range(rows):
            ordered_keys(scores[i], columns, keys[i])
        chosen = np.empty((columns, k), np.int32)
        mask = np.empty((rows, columns), scores.dtype)
        scratch = np.empty((3, columns), keys_type)
        first_k_largest_down(keys, k, chosen, mask, scratch[0], scratch[1], scratch[2], np.empty(columns, np.int32),
                             np.empty((row_bits_words(rows), columns), np.uint64))
        return chosen, mask

    chosen, mask = down(scores, k, keys_type)
    for c in range(scores.shape[1]):
        want = torch.empty(k, dtype=torch.int32)
        column = np.ascontiguousarray(scores[:, c])
        numba_jit_first_k(first_k_largest, column, np.arange(len(column), dtype=np.int32), k, want.numpy())
        assert chosen[c].tolist() == want.tolist(), f"column {c}"
        assert np.flatnonzero(mask[:, c]).tolist() == want.tolist()
        if name != "specials":  # and the k largest by an independent rule: a stable sort, ties to the first
            assert chosen[c].tolist() == sorted(np.argsort(-column, kind="stable")[:k].tolist()), f"column {c}"
    if name == "specials" and k == 1:
        assert chosen[0, 0] == 2 and chosen[1, 0] == 7  # NaN above everything, then +inf


@pytest.mark.parametrize("criterion", ["max", "sum"])
def test_dense_loops_score_a_nan_map_first(criterion):
    # One NaN input pixel makes every map of its channel NaN where it is seen: torch.amax (max) and the
    # sum score rank NaN first, so that channel is chosen by every output channel, as by the reference.
    x, w, _ = _conv_inputs(torch.float32)
    x[1, 4, 2, 2] = float("nan")
    got = TF.topk_conv2d_selection(x, w, 2, criterion, 1, 1, impl="numba")
    want = TF.topk_conv2d_selection(x, w, 2, criterion, 1, 1, impl="reference")
    assert (got[1] == 4).any(-1).all() and (want[1] == 4).any(-1).all()
    assert torch.equal(got[0].sort(-1).values, want[0].sort(-1).values)


def test_maps_are_finite_only_when_no_map_can_overflow_or_hold_nan():
    from topkconv.layers.kernels.numba_loops import maps_are_finite

    x, w, _ = _conv_inputs(torch.float32)
    weight_t = conv._channels_last(w)
    assert maps_are_finite(x, weight_t)
    for bad in (float("nan"), float("inf"), -float("inf")):
        spoiled = x.clone()
        spoiled[2, 3, 1, 1] = bad
        assert not maps_are_finite(spoiled, weight_t)
        assert not maps_are_finite(x, conv._channels_last(torch.where(w > 2, bad, w)))
    # finite values whose nine products could sum past float32's largest: the NaN-safe path serves
    assert not maps_are_finite(x * 1e19, weight_t * 1e19)
    assert maps_are_finite(x.double() * 1e19, weight_t.double() * 1e19)


@pytest.mark.parametrize("scale", [1.0, 1e19], ids=["finite-maps", "maps-may-overflow"])
def test_dense_loops_max_score_paths_agree_with_the_reference(scale, monkeypatch):
    # 1.0: the maps' max taken in the pass that computes them; 1e19: products reach infinity, the NaN-safe
    # max serves. Both must select as the reference, and the fast path must equal the NaN-safe one.
    from topkconv.layers.kernels import numba_loops

    x, w, _ = _conv_inputs(torch.float32)
    x, w = x * scale, w * scale
    got = TF.topk_conv2d_selection(x, w, 3, "max", 1, 1, impl="numba")
    want = TF.topk_conv2d_selection(x, w, 3, "max", 1, 1, impl="reference")
    if scale == 1.0:
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    else:  # infinite maps tie: compare the scores of the chosen channels, not their indices
        scores = conv_scores_reference(x, w)
        assert torch.equal(scores.gather(2, got.long()).sort(-1).values, scores.gather(2, want.long()).sort(-1).values)
    fast = TF.topk_conv2d(x, w, None, 3, "max", 1, 1, impl="numba")
    monkeypatch.setattr(numba_loops, "maps_are_finite", lambda padded, weight_t: False)
    safe = TF.topk_conv2d(x, w, None, 3, "max", 1, 1, impl="numba")
    torch.testing.assert_close(safe, fast, rtol=0, atol=0, equal_nan=True)  # infinite maps may sum to NaN


def conv_scores_reference(x, w):
    from topkconv.layers.topk_conv import channel_maps, channel_scores

    return channel_scores(channel_maps(x, w, 1, 1, 1), "max")


@pytest.mark.parametrize("m", [20, 64, 65, 100])  # up to 64 candidates ranked against each other, beyond bisected
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_first_k_largest_keeps_the_first_of_tied_candidates(m, dtype):
    import numpy as np

    from topkconv.layers.kernels.selection import first_k_largest

    row = torch.randint(0, 3, (m,), generator=torch.Generator().manual_seed(5)).to(dtype).numpy()
    row[7] = np.nan  # NaN ranks above everything
    k = 10
    chosen = torch.empty(k, dtype=torch.int32)
    total, kth = numba_jit_first_k(first_k_largest, row, np.arange(m, dtype=np.int32), k, chosen.numpy())
    keys = np.where(np.isnan(row), np.inf, row)
    want = sorted(np.argsort(-keys, kind="stable")[:k].tolist())
    assert chosen.tolist() == want
    assert np.isnan(total) and kth == np.sort(keys)[::-1][k - 1]


@pytest.mark.parametrize("m", [65, 100, 1000])  # beyond 64 candidates: the bisection, which may stop early
@pytest.mark.parametrize("k", [1, 10, 64])
def test_first_k_largest_bisection_picks_the_k_largest_of_distinct_and_tied_values(m, k):
    # The bisection stops at a midpoint that exactly k keys reach (distinct values: nearly always) and
    # otherwise runs down to the k-th key (ties across the k-th): both must select what a stable sort does.
    import numpy as np

    from topkconv.layers.kernels.selection import first_k_largest

    generator = torch.Generator().manual_seed(m + k)
    distinct = torch.randn(m, generator=generator).numpy()
    tied = torch.randint(0, 5, (m,), generator=generator).float().numpy()
    for row in (distinct, tied):
        chosen = torch.empty(k, dtype=torch.int32)
        total, kth = numba_jit_first_k(first_k_largest, row, np.arange(m, dtype=np.int32), k, chosen.numpy())
        want = sorted(np.argsort(-row, kind="stable")[:k].tolist())
        assert chosen.tolist() == want
        assert kth == np.sort(row)[::-1][k - 1]
        assert total == pytest.approx(float(row[want].sum()), rel=1e-5, abs=1e-4)  # float32 sums


def _jit_first_k_above(row, positions, k, bound):
    import numpy as np

    from topkconv.layers.kernels.jit import jit
    from topkconv.layers.kernels.selection import first_k_largest_above

    @jit
    def call(row, positions, k, bound, values, keys, chosen):
        return first_k_largest_above(row, positions, positions.shape[0], k, bound, values, keys, chosen)

    chosen = np.empty(k, np.int32)
    keys = np.empty(row.shape[0], np.int32 if row.itemsize == 4 else np.int64)
    total, kth = call(row, positions, k, row.dtype.type(bound), np.empty_like(row), keys, chosen)
    return chosen, total, kth


ABOVE_ROWS = {  # name: (row, k); the bound is the row's (k + extra)-th largest value or its minimum
    "distinct": (lambda g: torch.randn(200, generator=g), 13),
    "ties at the k-th": (lambda g: torch.randint(0, 6, (200,), generator=g).float(), 13),
    "adjacent floats": (lambda g: torch.tensor([1.0, 1.0000001, 1.0000002, 0.5] * 10), 5),
    "k = 1 at a tied top": (lambda g: torch.tensor([3.0, 1.0, 3.0, 2.0] * 8), 1),
    "k = m": (lambda g: torch.randn(40, generator=g), 40),
    "magnitudes apart": (lambda g: torch.tensor([1e-30, 2e-30, 1e30, 3e-30, 5.0] * 9), 20),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("extra", [0, 4, 1000])
@pytest.mark.parametrize("name", list(ABOVE_ROWS), ids=list(ABOVE_ROWS))
def test_first_k_largest_above_bisects_the_values_and_picks_what_a_stable_sort_does(name, extra, dtype):
    # The candidates at or above a bound that at least k of them reach: the value bisection finds a threshold
    # exactly k reach, or (ties at the k-th, adjacent floats) hands the row to the ranking; either way the
    # k of a stable sort, in position order, and the same sum and k-th value as first_k_largest's.
    import numpy as np

    from topkconv.layers.kernels.selection import first_k_largest

    make, k = ABOVE_ROWS[name]
    row = make(torch.Generator().manual_seed(3)).to(dtype).numpy()
    ordered = np.sort(row)[::-1]
    bound = ordered[min(k - 1 + extra, len(row) - 1)]
    positions = np.flatnonzero(row >= bound).astype(np.int32)
    chosen, total, kth = _jit_first_k_above(row, positions, k, bound)
    want = sorted(np.argsort(-row, kind="stable")[:k].tolist())
    assert chosen.tolist() == want
    assert kth == ordered[k - 1]
    reference = torch.empty(k, dtype=torch.int32).numpy()
    assert (total, kth) == numba_jit_first_k(first_k_largest, row, np.arange(len(row), dtype=np.int32), k,
                                             reference)


def test_bounded_wide_rows_give_ties_at_the_kth_to_the_first_positions():
    # Rows of 2,100 products (the bounded path) drawn from 5 values, so the k-th value is tied many times
    # over: every row after a weight row's first (which the quickselect of select_row takes, ties in any
    # order) is bounded, packed in position order and must keep the first tied positions, as a stable sort.
    import numpy as np

    k = 40
    assert bounded_wins(2100, k)
    x = torch.randint(0, 5, (6, 2100), generator=torch.Generator().manual_seed(9)).float()
    w = torch.ones(2, 2100)
    chosen = TF.topk_linear_selection(x, w, k, impl="numba")
    for b in range(1, 6):
        want = sorted(np.argsort(-x[b].numpy(), kind="stable")[:k].tolist())
        assert chosen[b, 0].sort().values.tolist() == want
        assert chosen[b, 1].sort().values.tolist() == want


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n", [0, 1, 5, 15, 16, 17, 250, 256, 1000])
def test_simd_packing_and_counting_agree_with_a_plain_comparison(n, dtype):
    # 16 entries at a time (the vector compress; the count's last block masked out of the load, and past n lie
    # values that would count), the packing's last n % 16 one by one: in order, NaN never kept or counted,
    # entries equal to the bound kept and counted.
    import numpy as np

    from topkconv.layers.kernels.jit import jit
    from topkconv.layers.kernels.simd import count_at_least, positions_at_least

    @jit
    def call(row, n, bound, positions):
        return positions_at_least(row[:n], bound, positions), count_at_least(row, n, bound)

    row = torch.randn(n + 16, generator=torch.Generator().manual_seed(n)).numpy().astype(dtype)
    row[::7] = np.nan
    row[1::11] = 0.5
    row[n:] = 10.0
    positions = np.full(n, -1, np.int32)
    for bound in (-np.inf, 0.5, 1.0, np.inf):
        m, count = call(row, n, row.dtype.type(bound), positions)
        assert positions[:m].tolist() == np.flatnonzero(row[:n] >= bound).tolist()
        assert count == m


def test_simd_python_fallbacks_give_what_the_intrinsics_give(monkeypatch):
    # Without numba the loops run as plain Python (jit.AVAILABLE False): simd's fallbacks must pack, count and
    # borrow as its intrinsics do.
    import importlib

    import numpy as np

    from topkconv.layers.kernels import jit, simd

    row = torch.randn(37, generator=torch.Generator().manual_seed(2)).numpy()
    row[3] = np.nan
    compiled = jit.jit(lambda row, bound, positions: (simd.positions_at_least(row, bound, positions),
                                                      simd.count_at_least(row, row.shape[0], bound),
                                                      simd.borrowed(positions)[0]))
    want_positions = np.zeros(37, np.int32)
    want = compiled(row, np.float32(0.1), want_positions)
    w_i, g_b = np.arange(36.0).reshape(9, 4) - 17.5, np.arange(20.0).reshape(4, 5) * 0.5  # 5 positions: a tail
    chosen = np.array([3, 0, 2], np.int32)
    want_taps = np.full((9, 5), -1.0)
    jit.jit(lambda *args: simd.taps_block_3x3(*args))(w_i, g_b, chosen, 3, 0, want_taps)
    cols_b, want_sums = np.arange(45.0).reshape(9, 5) * 0.25 - 5, np.ones((4, 9, 16))
    jit.jit(lambda *args: simd.weight_taps_block_3x3(*args))(cols_b, g_b, chosen, 3, 0, want_sums)
    cols_all, weight_c, want_routed = np.stack([cols_b, cols_b[::-1]]), w_i[:, :2].T.copy(), np.full(20, -1.0)
    jit.jit(lambda *args: simd.routed_block_3x3(*args))(cols_all, weight_c, np.array([1, 0], np.int32), 0, want_routed)
    monkeypatch.setattr(jit, "AVAILABLE", False)
    monkeypatch.setattr(jit, "numba", None)
    fallback = importlib.reload(simd)
    try:
        positions = np.zeros(37, np.int32)
        got = (fallback.positions_at_least(row, np.float32(0.1), positions),
               fallback.count_at_least(row, 37, np.float32(0.1)), fallback.borrowed(positions)[0])
        assert got == want and positions[:got[0]].tolist() == want_positions[:want[0]].tolist()
        got_taps = np.full((9, 5), -1.0)
        fallback.taps_block_3x3(w_i, g_b, chosen, 3, 0, got_taps)
        np.testing.assert_allclose(got_taps, want_taps, rtol=1e-12)
        np.testing.assert_allclose(want_taps, w_i[:, chosen] @ g_b[chosen], rtol=1e-12)
        got_sums = np.ones((4, 9, 16))
        fallback.weight_taps_block_3x3(cols_b, g_b, chosen, 3, 0, got_sums)
        np.testing.assert_allclose(got_sums, want_sums, rtol=1e-12)
        assert np.all(want_sums[:, :, 5:] == 1) and np.all(want_sums[1] == 1)  # past L and unchosen: untouched
        np.testing.assert_allclose(want_sums[chosen, :, :5], 1 + cols_b[None] * g_b[chosen][:, None], rtol=1e-12)
        got_routed = np.full(20, -1.0)
        fallback.routed_block_3x3(cols_all, weight_c, np.array([1, 0], np.int32), 0, got_routed)
        np.testing.assert_allclose(got_routed, want_routed, rtol=1e-12)
        assert np.all(want_routed[5:] == -1)  # past L: untouched
        np.testing.assert_allclose(want_routed[:5], weight_c[0] @ cols_b + weight_c[1] @ cols_b[::-1], rtol=1e-12)
    finally:
        monkeypatch.undo()
        importlib.reload(simd)


def _dynamic_k_reference(x, w, k, positive_only):
    products = x[:, None, :] * w[None]
    return (products.clamp(min=0) if positive_only else products).topk(k, -1).values.sum(-1)


# (samples, inputs, k): whole and partial 16-sample blocks, k = 1 (one register), 13 (the quick model) and 16
# (the largest network), k = inputs (every product), k = 17 (no network: the indexed loops serve)
_VALUES_CASES = [(1, 16, 1), (5, 37, 13), (16, 256, 13), (40, 300, 16), (33, 16, 16), (17, 64, 17)]


@pytest.mark.parametrize("positive_only", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch, fan_in, k", _VALUES_CASES, ids=[f"{b}x{i}-k{k}" for b, i, k in _VALUES_CASES])
def test_sorted_registers_match_the_reference_and_the_search_loops(batch, fan_in, k, positive_only, dtype):
    # Dynamic-k's forward for k <= 16 (sorted registers), with and without indices, against the reference formula,
    # and to the bit against the search loops it replaces (the same sums in the same order, the same indices)
    from topkconv.layers.kernels import numba_loops

    g = torch.Generator().manual_seed(batch * 100 + k)
    x, w = torch.randn(batch, fan_in, generator=g, dtype=dtype), torch.randn(9, fan_in, generator=g, dtype=dtype)
    x[:, ::5] = 0.0  # products tied at 0 (and -0.0): ties at the k-th value in some rows
    values = numba_loops.linear_values(x, w, k, positive_only)
    out, indices = numba_loops.linear_forward(x, w, k, positive_only)
    assert values.shape == (batch, 9) and values.is_contiguous() and indices.shape == (batch, 9, k)
    torch.testing.assert_close(values, _dynamic_k_reference(x, w, k, positive_only))
    searched_out, searched_indices = numba_loops._linear_forward_searched(x, w, k, positive_only)
    assert torch.equal(values, searched_out) and torch.equal(out, searched_out)
    assert torch.equal(indices, searched_indices)


def test_forward_values_sum_tied_products_exactly():
    # Small integers: every sum exact in any order. Many products tie at the k-th value (and, positive-only, at 0):
    # the sum of the k largest does not depend on which tied ones are taken.
    from topkconv.layers.kernels import numba_loops

    g = torch.Generator().manual_seed(5)
    x, w = torch.randint(-2, 3, (40, 64), generator=g).float(), torch.randint(-2, 3, (11, 64), generator=g).float()
    for positive_only in (False, True):
        for k in (1, 7, 16):
            want = _dynamic_k_reference(x, w, k, positive_only)
            assert torch.equal(numba_loops.linear_values(x, w, k, positive_only), want)


def test_forward_values_redo_samples_with_nan_or_infinite_products():
    # The network's comparisons do not order NaN: those samples (and infinite ones) are redone by the indexed loops,
    # whose ranking puts NaN first as torch.topk does; the other samples keep the network's sums.
    from topkconv.layers.kernels import numba_loops

    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(20, 48, generator=g), torch.randn(7, 48, generator=g)
    x[3, 5], x[11, 2], x[12, 0] = float("nan"), float("inf"), -float("inf")
    got, want = numba_loops.linear_values(x, w, 4, False), numba_loops._linear_forward_searched(x, w, 4, False)
    assert torch.equal(got.isnan(), want[0].isnan()) and got[3].isnan().all()
    torch.testing.assert_close(got.nan_to_num(), want[0].nan_to_num())
    out, indices = numba_loops.linear_forward(x, w, 4, False)
    assert torch.equal(out.nan_to_num(), want[0].nan_to_num()) and torch.equal(indices, want[1])
    clean = [b for b in range(20) if b not in (3, 11, 12)]
    torch.testing.assert_close(got[clean], _dynamic_k_reference(x[clean], w, 4, False))


def test_forward_values_on_two_threads_give_the_same_numbers():
    from topkconv.layers.kernels import numba_loops

    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(64, 256, generator=g), torch.randn(128, 256, generator=g)
    assert x.numel() * w.shape[0] >= bridge.MIN_THREADED_WORK  # big enough to be split
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = numba_loops.linear_values(x, w, 13, False)
        torch.set_num_threads(2)
        two = numba_loops.linear_values(x, w, 13, False)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_topk_linear_runs_the_sorted_registers_for_small_k(monkeypatch):
    # For k <= 16 TopKLinear's value (and in grad mode its indices) come from the sorted registers, not the search.
    from topkconv.layers.kernels import numba_loops

    layer = TopKLinear(40, 6, 5, impl="numba")
    x = torch.randn(9, 40, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = _dynamic_k_reference(x, layer.weight, 5, False) + layer.bias
        selection = numba_loops._linear_forward_searched(x, layer.weight, 5, False)[1]
    monkeypatch.setattr(numba_loops, "_linear_forward_searched", lambda *a: pytest.fail("the search loops ran"))
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), want)
    out = layer(x.requires_grad_())
    torch.testing.assert_close(out.detach(), want)
    out.sum().backward()  # the gradient from the saved indices: the search loops' selection
    chosen = selection.long()
    weights = layer.weight.detach()[None].expand(9, 6, 40).gather(2, chosen)
    torch.testing.assert_close(x.grad, torch.zeros(9, 40).scatter_add_(1, chosen.flatten(1), weights.flatten(1)))


def test_sorted_registers_python_fallbacks_give_what_the_intrinsics_give(monkeypatch):
    import importlib

    import numpy as np

    from topkconv.layers.kernels import jit, simd

    g = torch.Generator().manual_seed(9)
    xt, w_row = torch.randn(30, 21, generator=g).double().numpy(), torch.randn(30, generator=g).double().numpy()
    compiled = jit.jit(lambda *args: simd.top_k_sums_block(*args))
    want = {}  # start -> (sums, totals, k-th values)
    xt[7], w_row[7] = xt[4], w_row[4]  # inputs 4 and 7 give equal products in every lane
    for start, k, positive_only in ((0, 3, False), (16, 16, True)):  # a whole and a partial block (5 samples)
        sums, totals, kths = np.full(21, -1.0), np.full(21, -1.0), np.full(21, -1.0)
        compiled(xt, w_row, start, k, positive_only, sums, totals, kths)
        want[start] = sums, totals, kths
    keys = torch.randint(-5, 6, (7, 21), generator=g).int().numpy()
    mids, want_counts = keys[3].copy(), np.full(21, -1, np.int32)
    counting = jit.jit(lambda keys, mids, counts: [simd.count_down_block(keys, mids, s, counts) for s in (0, 16)])
    counting(keys, mids, want_counts)
    words = np.array([1, 8, 2**63], np.uint64)
    want_zeros = jit.jit(lambda words: [simd.trailing_zeros(w) for w in words])(words)
    monkeypatch.setattr(jit, "AVAILABLE", False)
    monkeypatch.setattr(jit, "numba", None)
    fallback = importlib.reload(simd)
    try:
        counts = np.full(21, -1, np.int32)
        for start in (0, 16):  # a whole and a partial block of columns
            fallback.count_down_block(keys, mids, start, counts)
        assert counts.tolist() == want_counts.tolist() == (keys >= mids).sum(0).tolist()
        assert [fallback.trailing_zeros(w) for w in words] == list(want_zeros) == [0, 3, 63]
        for start, k, positive_only in ((0, 3, False), (16, 16, True)):
            sums, totals, kths = np.full(21, -1.0), np.full(21, -1.0), np.full(21, -1.0)
            fallback.top_k_sums_block(xt, w_row, start, k, positive_only, sums, totals, kths)
            np.testing.assert_allclose(sums, want[start][0], rtol=1e-12)
            np.testing.assert_allclose(totals, want[start][1], rtol=1e-12)
            np.testing.assert_array_equal(kths, want[start][2])
            stop = min(start + 16, 21)
            products = xt[:, start:stop] * w_row[:, None]
            products = np.maximum(products, 0) if positive_only else products
            np.testing.assert_allclose(sums[start:stop], -np.sort(-products, 0)[:k].sum(0), rtol=1e-12)
            np.testing.assert_array_equal(kths[start:stop], -np.sort(-products, 0)[k - 1])
            assert np.all(sums[:start] == -1) and np.all(sums[stop:] == -1)  # other samples: untouched
    finally:
        monkeypatch.undo()
        importlib.reload(simd)
