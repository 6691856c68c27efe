"""topkconv shortens torch's OpenMP spin (GOMP_SPINCOUNT) when it is imported before torch, and never overrides
the user's own spin setting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from topkconv._openmp import SPIN_COUNT, shorten_openmp_spin


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
