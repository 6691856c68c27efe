"""Routing layers. Each layer file holds its functional form, its autograd Function(s) and its module
(:mod:`topkconv.functional` re-exports the functional forms); the kernels behind them sit in
:mod:`topkconv.layers.kernels`."""

from ._args import IMPLS, resolve_k
from .bpda import bpda_enabled, dense_gradients, gradient_mode, soft_gradients
from .sap import StochasticActivationPruning
from .topk_conv import TopKConv2d
from .topk_linear import TopKLinear
from .topk_neuron import TopKNeuronConv2d

__all__ = ["TopKLinear", "TopKConv2d", "TopKNeuronConv2d", "StochasticActivationPruning",
           "dense_gradients", "soft_gradients", "gradient_mode", "bpda_enabled", "resolve_k", "IMPLS"]
