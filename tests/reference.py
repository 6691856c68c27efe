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
    samples = []
    for b in range(y.shape[0]):
        scores = [float(y[b, c].detach().max()) if criterion == "max" else float(y[b, c].detach().sum()) for c in range(y.shape[1])]
        best = set(sorted(range(y.shape[1]), key=lambda c: -scores[c])[:k])
        samples.append(torch.stack([y[b, c] if c in best else torch.zeros_like(y[b, c]) for c in range(y.shape[1])]))
    return torch.stack(samples)


def naive_sap_expectation_scale(h, frac):
    """Per-activation keep probability 1 - (1 - p)^r of SAP, for one sample."""
    p = h.abs().flatten() / h.abs().sum()
    r = max(1, round(frac * p.numel()))
    return 1 - (1 - p) ** r
