"""How the routing layers back-propagate: exactly, through a dense stand-in, or through a soft relaxation.

Athalye et al. (2018) attack a non-differentiable or gradient-masking component through a
differentiable stand-in (BPDA). The forward value of every layer stays exact in every mode; only the
backward pass changes (inside :func:`stand_in_values` the forward value is the stand-in's too):

* ``"exact"`` (default): the gradient of the top-k layer itself (it reaches only what was selected).
* ``"dense"`` (:func:`dense_gradients`): the gradient of the dense layer with the same weights, as
  if k were the fan-in. It ignores the selection altogether.
* ``"soft"`` (:func:`soft_gradients`): the gradient of a smooth relaxation of each layer's top-k
  selection: every candidate i of a (sample, output) row is weighted by
  ``sigmoid((score_i - t) / tau)``, with the threshold ``t`` halfway between the row's k-th and
  (k+1)-th scores. Gradient reaches the near-selected candidates too, and flows through each
  sigmoid's dependence on the score (``t`` itself is held fixed). Each layer file defines its
  relaxation (``soft_*`` there).

``tau``: by default per layer and row, :data:`DEFAULT_TAU_FRACTION` times the standard deviation of
that row's scores (so the relaxation is scale-free); ``soft_gradients(tau=...)`` sets one absolute
temperature for every layer. As ``tau -> 0`` the soft gradient tends to the exact one (on rows
without a tie at the threshold); as it grows, every candidate's weight tends to 1/2 (half the
dense stand-in's gradient).

    with topkconv.layers.soft_gradients():
        x_adv = pgd(model, x, y, ...)

Modes nest, and each block restores the previous mode on exit, also after an exception.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from .kernels.budget import chunks, units_per_chunk

MODES = ("exact", "dense", "soft")
# Fraction of a row's score standard deviation used as its temperature: wide enough that the
# candidates just below the threshold get a real share of the gradient, narrow enough that the
# relaxation still ranks like the top-k (about the nearest 10% of a standard deviation on each side).
DEFAULT_TAU_FRACTION = 0.1

_state = threading.local()


def gradient_mode() -> str:
    """The backward mode in force in this thread: ``"exact"``, ``"dense"`` or ``"soft"``."""
    return getattr(_state, "mode", "exact")


def soft_tau() -> Optional[float]:
    """The absolute temperature set by :func:`soft_gradients`, or None for the per-row default."""
    return getattr(_state, "tau", None)


def bpda_enabled() -> bool:
    """Whether the dense stand-in is in force (:func:`dense_gradients`)."""
    return gradient_mode() == "dense"


@contextlib.contextmanager
def _mode(mode: str, tau: Optional[float]):
    previous = (gradient_mode(), soft_tau())
    _state.mode, _state.tau = mode, tau
    try:
        yield
    finally:
        _state.mode, _state.tau = previous


def stand_in_forward() -> bool:
    """Whether the routing layers' forward values are their stand-ins' too (:func:`stand_in_values`)."""
    return getattr(_state, "values", False)


@contextlib.contextmanager
def stand_in_values():
    """Inside this block, under :func:`dense_gradients` or :func:`soft_gradients`, every routing layer's
    forward value is its stand-in's too (the dense layer, or the soft relaxation), not only its gradient: the
    model becomes its stand-in model, a surrogate of the same defended model (Pintor et al. 2022's transfer
    failure attacks it and judges its points on the real model). Under the exact mode nothing changes."""
    previous = stand_in_forward()
    _state.values = True
    try:
        yield
    finally:
        _state.values = previous


def dense_gradients(enabled: bool = True):
    """Inside this block every routing layer's backward pass is that of its dense stand-in
    (``enabled=False``: the exact gradients)."""
    return _mode("dense" if enabled else "exact", None)


def soft_gradients(tau: Optional[float] = None):
    """Inside this block every routing layer back-propagates through its soft relaxation.

    ``tau``: None for the per-row default (:data:`DEFAULT_TAU_FRACTION` of the row's score standard
    deviation), or one positive float used by every layer."""
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float))
                            or not math.isfinite(tau) or tau <= 0):
        raise ValueError(f"tau must be a positive finite float or None, got {tau!r}")
    return _mode("soft", None if tau is None else float(tau))


def straight_through(forward_value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Value of ``forward_value``, gradient of ``surrogate``."""
    return forward_value.detach() + (surrogate - surrogate.detach())


def gate_parameters(scores: torch.Tensor, k: int, tau: Optional[float]):
    """(threshold, tau) of :func:`soft_gate`, each shaped like ``scores`` with a last dim of 1: the
    threshold halfway between each row's k-th and (k+1)-th largest score, ``tau`` None: the row's
    standard deviation times :data:`DEFAULT_TAU_FRACTION`. Not differentiable (held fixed).

    With k equal to the row length every candidate is kept: threshold -inf."""
    with torch.no_grad():
        if k >= scores.shape[-1]:
            threshold = scores.new_full(scores.shape[:-1] + (1,), float("-inf"))
        else:
            top = scores.topk(k + 1, dim=-1).values
            threshold = (top[..., k - 1:k] + top[..., k:k + 1]) / 2
        if tau is None:
            spread = scores.std(dim=-1, keepdim=True) * DEFAULT_TAU_FRACTION if scores.shape[-1] > 1 else None
            # a constant row (or one entry): the tiniest temperature, a step
            tau = torch.full_like(threshold, torch.finfo(scores.dtype).tiny) if spread is None else \
                spread.nan_to_num(0.0).clamp_min(torch.finfo(scores.dtype).tiny)
        else:
            tau = torch.full_like(threshold, tau)
    return threshold, tau


def soft_gate(scores: torch.Tensor, k: int, tau: Optional[float]) -> torch.Tensor:
    """``sigmoid((scores - t) / tau)`` along the last dim with (t, tau) from :func:`gate_parameters`.
    Differentiable in ``scores`` (t and tau held fixed). Callers pass :func:`soft_tau` as it was at
    forward time, so a recomputation during backward, outside the ``with`` block, sees the same
    temperature."""
    threshold, tau = gate_parameters(scores, k, tau)
    return torch.sigmoid((scores - threshold) / tau)


def needs_autograd(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd will record an op on ``tensors``: grad mode on and one of them needs a gradient.
    If not (``torch.no_grad()``, ``torch.inference_mode()``, attacks' forward-only queries), the routing
    layers call their kernels directly: no autograd Function, nothing saved for a backward pass."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def route_gradients(exact, dense, soft, *inputs: Optional[torch.Tensor]) -> torch.Tensor:
    """A routing layer's output under the current :func:`gradient_mode`.

    ``exact()``: the layer's own output (with its own gradient); ``dense()`` and ``soft(tau)``: the
    surrogates whose gradient the other modes pass back while the value stays ``exact()``'s. No
    surrogate is built when none of ``inputs`` (the layer's tensors) needs a gradient."""
    mode = gradient_mode()
    if mode != "exact" and stand_in_forward():   # the stand-in model: its value, and its own gradient
        return dense() if mode == "dense" else soft(soft_tau())
    if mode == "exact" or not needs_autograd(*inputs):
        return exact()
    with torch.no_grad():
        value = exact()
    return straight_through(value, dense() if mode == "dense" else soft(soft_tau()))


def checkpointed_chunks(fn, x: torch.Tensor, per_sample_bytes: int, *args) -> torch.Tensor:
    """``fn(x_chunk, *args)`` concatenated over chunks of samples sized by the memory budget, each
    chunk recomputed during backward (torch checkpointing): the soft surrogates materialise the
    products or channel maps, and this keeps only one chunk's worth of them alive."""
    size = units_per_chunk(per_sample_bytes, max(1, x.shape[0]))
    parts = [checkpoint(fn, x[s:e], *args, use_reentrant=False) for s, e in chunks(x.shape[0], size)]
    return torch.cat(parts) if parts else fn(x, *args)
