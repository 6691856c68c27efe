import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # so tests can import reference.py

# One intra-op thread for the whole suite. The test models are tiny, and on these 2-core VMs two
# torch threads were measured far slower than one whenever anything else runs (a small conv step
# 26 ms with one thread vs 100 ms with two; a tiny training loop 0.6 s vs 37 s): the threads spin.
torch.set_num_threads(1)
