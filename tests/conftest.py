import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # so tests can import reference.py and trained_models.py

import trained_models  # noqa: E402

# One intra-op thread for the whole suite. The test models are tiny, and on these 2-core VMs two
# torch threads were measured far slower than one whenever anything else runs (a small conv step
# 26 ms with one thread vs 100 ms with two; a tiny training loop 0.6 s vs 37 s): the threads spin.
torch.set_num_threads(1)


# Trained test models, shared by every test file. The builders cache their model for the process, so
# each trains once per session; tests that change a model's mode put it back.

@pytest.fixture(scope="session")
def digits_test():
    """(x, y): the 300 held-out digits in [0, 1], shape (300, 1, 8, 8)."""
    return trained_models.eval_data()


@pytest.fixture(scope="session")
def mlp():
    """A plain MLP, 64-64-10 (about 97% clean accuracy)."""
    return trained_models.trained_mlp()


@pytest.fixture(scope="session")
def surrogate():
    """A second plain MLP (other seed and width): the transfer attack's surrogate."""
    return trained_models.trained_surrogate()


@pytest.fixture(scope="session")
def cnn():
    """A plain CNN (two convs and a linear head): the model on which no masking indicator may fire."""
    return trained_models.trained_cnn()


@pytest.fixture(scope="session")
def sap_mlp():
    """The MLP with Stochastic Activation Pruning after its hidden layer: a randomised defence."""
    return trained_models.trained_sap()


@pytest.fixture(scope="session")
def routing_mlp():
    """The MLP with its hidden layer as a TopKLinear (k = 16 of 64): a routing defence."""
    return trained_models.trained_routing()


# The torchvision tests need the optional `vision` extra; where torchvision is missing (the main .venv) the
# file is not collected at all (rather than skipped), and `make test` runs it in .venv-vision.
try:
    import torchvision  # noqa: F401
except ImportError:
    collect_ignore = ["test_vision.py"]
