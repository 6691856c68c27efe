"""Routing layers. Each has a functional twin in :mod:`topkconv.functional`."""

from ._args import resolve_k
from .bpda import bpda_enabled, dense_gradients
from .sap import StochasticActivationPruning
from .topk_conv import TopKConv2d
from .topk_linear import TopKLinear
from .topk_neuron import TopKNeuronConv2d

ROUTING_LAYERS = (TopKLinear, TopKConv2d, TopKNeuronConv2d)

__all__ = ["TopKLinear", "TopKConv2d", "TopKNeuronConv2d", "StochasticActivationPruning",
           "dense_gradients", "bpda_enabled", "resolve_k", "ROUTING_LAYERS"]
