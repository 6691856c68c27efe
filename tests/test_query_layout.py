"""The query-heavy attacks run the model's convolutions in channels-last memory (``query_layout``): the same values
up to float rounding, and the model handed back holding the very tensors it held before."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from topkconv import convert
from topkconv.attacks import autoattack, pgd, predict, square, zeroth_order
from topkconv.attacks.common import query_layout
from topkconv.attacks.eot import eot_pgd

EPS = 16 / 255
CL = torch.channels_last


class LayoutSpy(nn.Conv2d):
    """A conv that records, at each forward, whether its weight was in channels-last memory."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def forward(self, x):
        self.seen.append(self.weight.is_contiguous(memory_format=CL))
        return super().forward(x)


def small_cnn(seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    # the spy is the second conv: a weight with one input channel is channels-last and contiguous at once
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), LayoutSpy(8, 8, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()


def snapshot(model: nn.Module) -> list:
    return [(t, t.data.data_ptr(), t.stride()) for t in (*model.parameters(), *model.buffers())]


def assert_same_tensors(model: nn.Module, before: list) -> None:
    for tensor, pointer, stride in before:
        assert tensor.data.data_ptr() == pointer and tensor.stride() == stride


def test_inside_the_block_conv_weights_are_channels_last_and_the_values_the_same(digits_test):
    model = small_cnn()
    x = digits_test[0][:32]
    before, plain = snapshot(model), model(x)
    with query_layout(model):
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1]
        assert all(c.weight.is_contiguous(memory_format=CL) and not c.weight.is_contiguous() for c in convs)
        fast = model(x)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert_same_tensors(model, before)


def test_the_tensors_come_back_when_the_block_raises():
    model = small_cnn()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), query_layout(model):
        raise RuntimeError("boom")
    assert_same_tensors(model, before)


def test_shared_parameters_stay_shared_and_routed_convs_agree(digits_test):
    dense = small_cnn()
    routed = convert(small_cnn(), "topk_conv", targets=["3"], k=0.5, criterion="max")
    routed.load_state_dict(dense.state_dict())
    shared = nn.ModuleDict({"dense": dense, "routed": routed})
    routed[3].weight = dense[3].weight   # one Parameter in two models
    x = digits_test[0][:16]
    plain, before = routed(x), snapshot(shared)
    with torch.inference_mode(), query_layout(shared):
        assert routed[3].weight is dense[3].weight and dense[3].weight.is_contiguous(memory_format=CL)
        fast = routed(x)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert_same_tensors(shared, before)


QUERY_ATTACKS = {
    "zeroth-order": lambda m, x, y: zeroth_order(m, x, y, EPS, steps=2, step_size=EPS / 2, samples=10,
                                                 generator=torch.Generator().manual_seed(0)),
    "square": lambda m, x, y: square(m, x, y, EPS, n_queries=5),
    "pgd": lambda m, x, y: pgd(m, x, y, EPS, EPS / 2, 2, generator=torch.Generator().manual_seed(0)),
    "eot-pgd": lambda m, x, y: eot_pgd(m, x, y, EPS, EPS / 2, 2, samples=2),
    "autoattack": lambda m, x, y: autoattack(m, x, y, EPS, attacks=("apgd-ce",), n_iter=2),
}


@pytest.mark.parametrize("name", sorted(QUERY_ATTACKS), ids=sorted(QUERY_ATTACKS))
def test_query_heavy_attacks_run_in_channels_last_and_give_the_model_back(name, digits_test):
    model = small_cnn()
    x, y = digits_test[0][:8], digits_test[1][:8]
    before = snapshot(model)
    QUERY_ATTACKS[name](model, x, y)
    assert model[3].seen and all(model[3].seen), name
    assert_same_tensors(model, before)


def test_predictions_keep_the_models_own_layout(digits_test):
    model = small_cnn()
    predict(model, digits_test[0][:8])
    assert model[3].seen and not any(model[3].seen)
