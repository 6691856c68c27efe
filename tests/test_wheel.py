"""The shipped specs and claims are package data: a wheel installed into a fresh venv (not editable, no
source tree on the path) finds them from any working directory, and a folder called ``experiments`` there
changes nothing."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
from pathlib import Path
import topkconv
from topkconv.reproduce.claims import default_path, load_claims
from topkconv.reproduce.driver import load_study
assert Path(topkconv.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), topkconv.__file__
studies = {(t, p): load_study(t, p, None, {}, None) for t in ("table1", "table2", "table3") for p in ("quick", "paper")}
claims = load_claims(default_path(), {s.name: s.table for s in studies.values() if s.table.preset == "quick"})
print("specs", len(studies), "claims", len(claims), "surrogate", studies["table3", "quick"].table.surrogate)
"""


@pytest.mark.slow
def test_a_wheel_install_finds_its_specs_from_any_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    source = tmp_path / "source"  # a copy: building leaves an egg-info beside the sources
    for part in ("src", "pyproject.toml", "README.md"):
        copy = shutil.copytree if (ROOT / part).is_dir() else shutil.copy
        copy(ROOT / part, source / part, **({"ignore": shutil.ignore_patterns("__pycache__", "*.egg-info")}
                                          if (ROOT / part).is_dir() else {}))
    wheels = tmp_path / "wheels"
    # the build backend installed here when it is new enough (pyproject.toml asks setuptools>=77), else pip's
    # isolated build environment, which fetches it from the configured index
    isolation = [] if _setuptools_major() < 77 else ["--no-build-isolation"]
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(wheels),
                            str(source)], capture_output=True, text=True, env=env)
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("topkconv-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, env=env)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, env=env)
    # torch and the other dependencies come from this interpreter's site-packages, after the venv's own
    # (a path line in a .pth file: the editable install's own .pth files there are not processed)
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True, env=env).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "experiments").mkdir(parents=True)  # a decoy: never read
    (elsewhere / "experiments" / "table3-quick.toml").write_text("not = [valid toml\n")
    checked = subprocess.run([python, "-c", CHECK], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.split()[:2] == ["specs", "6"] and "surrogate Baseline" in checked.stdout
    helped = subprocess.run([venv / "bin" / "topkconv", "reproduce", "--help"], cwd=elsewhere, env=env,
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "--spec" in helped.stdout, helped.stderr


def _setuptools_major() -> int:
    from importlib import metadata

    try:
        return int(metadata.version("setuptools").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return 0
