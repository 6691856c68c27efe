"""Functional twins of the routing layers in :mod:`topkconv.layers` (re-exported from the layer files).

Every function takes plain tensors (``weight`` and ``bias`` shaped as in ``nn.Linear`` / ``nn.Conv2d``)
and an ``impl`` switch:

* ``"reference"``: the paper's formula, written directly. It materialises the full product tensor
  (Dynamic-k) or the per-input-channel maps A (TopKConv) and lets autograd do the rest.
* ``"torch"``: the torch-level kernels (``layers/kernels/linear.py``, ``layers/kernels/conv.py``) that
  never build those tensors. They work in chunks bounded by :func:`set_memory_budget` and save only
  the inputs and the selected indices for backward. Same selection (ties aside) and same values.
  Torch ops only, so they run on any device and dtype.
* ``"numba"``: the same chunked kernels with their selection and their sparse parts (the output and
  the gradients of TopKConv walk only the k selected input channels) as compiled CPU loops
  (``layers/kernels/numba_loops.py``). CPU tensors of float32 or float64 only.
* ``"auto"``: the default, the fastest exact implementation available for the inputs: ``"numba"``
  where it applies (CPU float32/float64 with numba installed), else ``"torch"`` (CUDA, half
  precision, or numba not installed). The table is ``layers/kernels/backends.py``. ``"fast"``, the
  old name of ``"torch"``, is still accepted with a DeprecationWarning.

Inside :func:`topkconv.layers.dense_gradients` or :func:`topkconv.layers.soft_gradients` every routing
function returns its own forward value but the gradient of a stand-in (BPDA; see ``layers/bpda.py``).
"""

from __future__ import annotations

from .layers._args import IMPLS
from .layers.kernels.budget import get_memory_budget, memory_budget, set_memory_budget
from .layers.sap import stochastic_activation_pruning
from .layers.topk_conv import channel_maps, channel_scores, topk_conv2d, topk_conv2d_selection
from .layers.topk_linear import topk_linear, topk_linear_selection
from .layers.topk_neuron import topk_channel_mask, topk_channel_selection, topk_neuron_conv2d

__all__ = ["topk_linear", "topk_conv2d", "topk_neuron_conv2d", "stochastic_activation_pruning",
           "channel_maps", "channel_scores", "topk_channel_mask", "IMPLS",
           "get_memory_budget", "set_memory_budget", "memory_budget",
           "topk_linear_selection", "topk_conv2d_selection", "topk_channel_selection"]
