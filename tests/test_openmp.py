"""topkconv shortens torch's OpenMP spin (GOMP_SPINCOUNT) when it is imported before torch, and never overrides
the user's own spin setting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from topkconv._openmp import NUMBA_SPIN_COUNT, SPIN_COUNT, numba_workers_spin_briefly, shorten_openmp_spin


@pytest.mark.parametrize("environ,modules,expected", [
    ({}, {}, SPIN_COUNT),
    ({"GOMP_SPINCOUNT": "7"}, {}, "7"),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, {}, None),
    ({}, {"torch": object()}, None),
], ids=["set", "user-spin-count-kept", "user-wait-policy-kept", "torch-already-loaded"])
def test_spin_count_is_set_only_before_torch_and_without_a_user_setting(environ, modules, expected):
    changed = shorten_openmp_spin(environ, modules)
    assert environ.get("GOMP_SPINCOUNT") == expected
    assert changed == (expected == SPIN_COUNT)


def _spin_seen_by(code: str, **extra) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_importing_topkconv_first_sets_it_for_the_process():
    code = "import topkconv, torch, os; print(os.environ.get('GOMP_SPINCOUNT'))"
    assert _spin_seen_by(code) == SPIN_COUNT
    assert _spin_seen_by(code, GOMP_SPINCOUNT="123") == "123"
    assert _spin_seen_by("import torch, topkconv, os; print(os.environ.get('GOMP_SPINCOUNT'))") == "None"


@pytest.mark.parametrize("environ,inside", [
    ({"GOMP_SPINCOUNT": SPIN_COUNT}, NUMBA_SPIN_COUNT),
    ({"GOMP_SPINCOUNT": "7"}, "7"),
    ({"GOMP_SPINCOUNT": SPIN_COUNT, "OMP_WAIT_POLICY": "ACTIVE"}, SPIN_COUNT),
    ({}, None),
], ids=["ours-shortened", "user-spin-count-kept", "user-wait-policy-kept", "unset-kept"])
def test_numba_workers_spin_briefly_only_over_our_own_setting_and_restore_it(environ, inside):
    before = dict(environ)
    with numba_workers_spin_briefly(environ):
        assert environ.get("GOMP_SPINCOUNT") == inside
    assert environ == before


def test_numba_threading_layer_reads_the_brief_spin_and_torch_keeps_its_own():
    """In a process that imported topkconv first: after a routed convolution on numba's threads, the environment
    holds torch's spin count again, and the layer is one whose launches may come from several threads."""
    code = ("import topkconv, torch, os, numba\n"
            "from topkconv.layers import TopKConv2d\n"
            "from topkconv.layers.kernels import bridge\n"
            "torch.set_num_threads(2)\n"
            "TopKConv2d(64, 64, 3, k=32, padding=1, impl='numba')(torch.rand(64, 64, 4, 4))\n"
            "print(os.environ.get('GOMP_SPINCOUNT'), bridge._layer_safe is not None)")
    assert _spin_seen_by(code) == f"{SPIN_COUNT} True"
