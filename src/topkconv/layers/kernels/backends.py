"""The kernel backends and the table that picks one for an ``impl`` name and the input tensors.

A backend is an object with the operations the routing layers' autograd Functions call:

* ``supports(*tensors) -> bool``: whether it can run on these tensors (device, dtype);
* ``linear_forward(x, weight, k, positive_only) -> (out, indices)``,
  ``linear_values(x, weight, k, positive_only) -> out`` (the same output, for forward passes that save nothing)
  and ``linear_backward(x, weight, indices, grad_out, positive_only, need_x, need_w) -> (grad_x, grad_w)``;
* ``conv_forward(x, weight, k, criterion, stride, padding, dilation) -> (out, indices)`` and
  ``conv_backward(x, weight, indices, grad_out, stride, padding, dilation, need_x, need_w) -> (grad_x, grad_w)``.

``indices`` are int32 (B, out, k) selections; the Functions save them for backward and nothing else
beyond the inputs. Today there are two backends:

* ``"torch"``: the chunked torch-level kernels (:mod:`.linear`, :mod:`.conv`). Any device and dtype.
* ``"numba"``: compiled CPU loops (:mod:`.numba_loops`, :mod:`.selection`). CPU float32/float64.

A future GPU kernel (``"cuda"``, e.g. Triton or a CUDA extension) is one more class with these six
methods, one line in :data:`BACKENDS` (its key is also its ``impl`` name), and its name at the front of
:data:`AUTO_ORDER`.
"""

from __future__ import annotations

import torch

from . import conv, linear, numba_loops
from .jit import AVAILABLE as NUMBA_AVAILABLE


class TorchBackend:
    name = "torch"
    requirement = "nothing (any device and dtype)"
    router = conv.MASKED  # what the conv driver does with the selected channels

    def supports(self, *tensors: torch.Tensor) -> bool:
        return True

    def linear_forward(self, x, weight, k, positive_only):
        return linear.forward(x, weight, k, positive_only)

    def linear_values(self, x, weight, k, positive_only):
        return self.linear_forward(x, weight, k, positive_only)[0]

    def linear_backward(self, x, weight, indices, grad_out, positive_only, need_x, need_w):
        return linear.backward(x, weight, indices, grad_out, positive_only, need_x, need_w)

    def conv_forward(self, x, weight, k, criterion, stride, padding, dilation):
        return conv.forward(x, weight, k, criterion, stride, padding, dilation, router=self.router)

    def conv_backward(self, x, weight, indices, grad_out, stride, padding, dilation, need_x, need_w):
        return conv.backward(x, weight, indices, grad_out, stride, padding, dilation, need_x, need_w,
                             router=self.router)


class NumbaBackend(TorchBackend):
    """The torch-level conv driver (columns, scores, chunking) with the compiled router, and the
    compiled Dynamic-k loops. The only backend that converts tensors to numpy arrays."""

    name = "numba"
    requirement = "numba installed and CPU float32 or float64 tensors of one dtype"
    router = conv.COMPILED

    def supports(self, *tensors: torch.Tensor) -> bool:
        return NUMBA_AVAILABLE and all(
            t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and t.dtype == tensors[0].dtype
            for t in tensors)

    def linear_forward(self, x, weight, k, positive_only):
        return numba_loops.linear_forward(x, weight, k, positive_only)

    def linear_values(self, x, weight, k, positive_only):
        return numba_loops.linear_values(x, weight, k, positive_only)

    def linear_backward(self, x, weight, indices, grad_out, positive_only, need_x, need_w):
        return numba_loops.linear_backward(x, weight, indices, grad_out, positive_only, need_x, need_w)

    def conv_forward(self, x, weight, k, criterion, stride, padding, dilation):
        if conv.dense_loops_win(x, weight, k, stride, padding, dilation):
            return conv.forward_dense_loops(x, weight, k, criterion, stride, padding, dilation)
        return super().conv_forward(x, weight, k, criterion, stride, padding, dilation)

    def conv_backward(self, x, weight, indices, grad_out, stride, padding, dilation, need_x, need_w):
        if conv.dense_loops_win(x, weight, indices.shape[2], stride, padding, dilation):
            return conv.backward_dense_loops(x, weight, indices, grad_out, stride, padding, dilation, need_x, need_w)
        return super().conv_backward(x, weight, indices, grad_out, stride, padding, dilation, need_x, need_w)


# Each backend's name is also its ``impl`` name (layers/_args.py builds the list of impls from these keys).
BACKENDS = {"numba": NumbaBackend(), "torch": TorchBackend()}
# impl="auto": the first backend here that supports the inputs.
AUTO_ORDER = ("numba", "torch")


def resolve(impl: str, *tensors: torch.Tensor):
    """The backend that runs ``impl`` ("auto" or a backend's name: "numba", "torch") on ``tensors``.

    "auto" takes the first of :data:`AUTO_ORDER` that supports them: the numba loops on CPU float32 or
    float64, else the torch-level kernels (CUDA, half precision, numba not installed)."""
    if impl == "auto":
        return next(BACKENDS[name] for name in AUTO_ORDER if BACKENDS[name].supports(*tensors))
    if impl not in BACKENDS:
        raise ValueError(f"impl must be one of {('auto', *BACKENDS)} for a kernel, got {impl!r}")
    backend = BACKENDS[impl]
    if not backend.supports(*tensors):
        found = ", ".join(f"{t.dtype} on {t.device}" for t in tensors)
        raise ValueError(f"impl={impl!r} needs {backend.requirement}; got {found}"
                         + ("" if NUMBA_AVAILABLE else " (numba is not installed)"))
    return backend
