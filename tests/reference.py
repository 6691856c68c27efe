"""Naive formulas of the paper, written as plainly as possible (loops over samples, outputs and
input channels). The library's implementations are checked against these; nothing here is fast."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_topk_linear(x, weight, bias, k, positive_only=False):
    rows = []
    for b in range(x.shape[0]):
        outs = []
        for c in range(weight.shape[0]):
            products = weight[c] * x[b]
            if positive_only:
                products = torch.where(products > 0, products, torch.zeros_like(products))
            value = torch.sort(products, descending=True).values[:k].sum()
            outs.append(value + (bias[c] if bias is not None else 0))
        rows.append(torch.stack(outs))
    return torch.stack(rows)


def naive_channel_map(x, weight, b, c, i, stride, padding, dilation):
    """A[b, c, i]: input channel i of sample b convolved with the filter slice weight[c, i]."""
    return F.conv2d(x[b:b + 1, i:i + 1], weight[c:c + 1, i:i + 1], None, stride, padding, dilation)[0, 0]


def naive_topk_conv2d(x, weight, bias, k, criterion="max", stride=1, padding=0, dilation=1):
    samples = []
    for b in range(x.shape[0]):
        channels = []
        for c in range(weight.shape[0]):
            maps = [naive_channel_map(x, weight, b, c, i, stride, padding, dilation) for i in range(weight.shape[1])]
            scores = [float(m.detach().max()) if criterion == "max" else float(m.detach().sum()) for m in maps]
            best = sorted(range(len(maps)), key=lambda i: -scores[i])[:k]
            out = sum(maps[i] for i in best)
            channels.append(out + (bias[c] if bias is not None else 0))
        samples.append(torch.stack(channels))
    return torch.stack(samples)


def naive_selection_conv(x, weight, k, criterion="max", stride=1, padding=0, dilation=1):
    """The selected (c, i) pairs per sample, as a set, for the gradient-routing test."""
    chosen = []
    for b in range(x.shape[0]):
        pairs = set()
        for c in range(weight.shape[0]):
            maps = [naive_channel_map(x, weight, b, c, i, stride, padding, dilation) for i in range(weight.shape[1])]
            scores = [float(m.detach().max()) if criterion == "max" else float(m.detach().sum()) for m in maps]
            pairs |= {(c, i) for i in sorted(range(len(maps)), key=lambda i: -scores[i])[:k]}
        chosen.append(pairs)
    return chosen


def naive_tkc_neuron(x, weight, bias, k, criterion="max", stride=1, padding=0, dilation=1):
    y = F.conv2d(x, weight, bias, stride, padding, dilation)
    kept = naive_selection_neuron(x, weight, bias, k, criterion, stride, padding, dilation)
    return torch.stack([torch.stack([y[b, c] if c in kept[b] else torch.zeros_like(y[b, c]) for c in range(y.shape[1])])
                        for b in range(y.shape[0])])


def naive_sap_expectation_scale(h, frac):
    """Per-activation keep probability 1 - (1 - p)^r of SAP, for one sample."""
    p = h.abs().flatten() / h.abs().sum()
    r = max(1, round(frac * p.numel()))
    return 1 - (1 - p) ** r


def naive_selection_linear(x, weight, k, positive_only=False):
    """Per sample and output unit, the set of input features whose products are summed."""
    chosen = []
    for b in range(x.shape[0]):
        rows = []
        for c in range(weight.shape[0]):
            products = [float(weight[c, i] * x[b, i]) for i in range(weight.shape[1])]
            if positive_only:
                products = [max(p, 0.0) for p in products]
            rows.append(set(sorted(range(len(products)), key=lambda i: -products[i])[:k]))
        chosen.append(rows)
    return chosen


def naive_selection_neuron(x, weight, bias, k, criterion="max", stride=1, padding=0, dilation=1):
    """Per sample, the set of output channels TKC-neuron keeps."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation).detach()
    chosen = []
    for b in range(y.shape[0]):
        scores = [float(y[b, c].max()) if criterion == "max" else float(y[b, c].sum()) for c in range(y.shape[1])]
        chosen.append(set(sorted(range(y.shape[1]), key=lambda c: -scores[c])[:k]))
    return chosen


def min_gap(scores: torch.Tensor, k: int) -> float:
    """Gap between the k-th and (k+1)-th best score along the last dim: selection is stable under
    perturbations smaller than this."""
    if k >= scores.shape[-1]:
        return float("inf")
    top = scores.topk(k + 1, dim=-1).values
    return float((top[..., k - 1] - top[..., k]).min())


def seeded_without_ties(make, score_fn, k, gap=1e-3, tries=200):
    """Draw inputs from ``make(generator)`` until the top-k selection has no near-ties."""
    for seed in range(tries):
        g = torch.Generator().manual_seed(seed)
        tensors = make(g)
        if min_gap(score_fn(*tensors), k) > gap:
            return tensors
    raise AssertionError("could not draw inputs without near-ties")
