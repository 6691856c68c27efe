"""Data-parallel training under torchrun (2 CPU processes, gloo) matches one process at the same global batch.

The model has no BatchNorm: on the CPU each process would normalise with its own half of the batch
(SyncBatchNorm, used on CUDA, has no CPU kernel), and the two runs would rightly differ.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from topkconv.config import DataConfig, defense_config, ModelConfig, RunSpec, TrainConfig
from topkconv.data import load_data
from topkconv.models import build_model
from topkconv.train import epoch_seed, fit, resolve_spec

FLAGS = ["--dataset", "digits", "--image-size", "16", "--limit-train", "80", "--limit-test", "20",
         "--model", "vgg-small", "--no-batch-norm", "--width", "0.25", "--hidden", "32", "--defense", "dynamic_k",
         "--fc-k", "0.1", "0.5", "--batch-size", "32", "--epochs", "2", "--lr", "0.02", "--seed", "3",
         "--device", "cpu", "--no-progress"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch build has no gloo backend")
def test_two_processes_match_one_process(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "topkconv.cli", "train", *FLAGS, "--out", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # The same run in this process: augmentation on, 80 images = batches of 32, 32 and 16 per epoch.
    spec = RunSpec(data=DataConfig(name="digits", image_size=16, limit_train=80, limit_test=20),
                   model=ModelConfig(arch="vgg-small", width=0.25, hidden=32, batch_norm=False,
                                     defense=defense_config(kind="dynamic_k", fc_k=[0.1, 0.5])),
                   train=TrainConfig(epochs=2, batch_size=32, lr=0.02, seed=3, device="cpu"))
    single, summary = fit(spec, tmp_path / "single", progress=False)

    run = json.loads((out / "run.json").read_text())
    assert run["hash"] == spec.hash() and run["extra"]["train"]["world_size"] == 2
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in metrics] == [1, 2]  # only rank 0 wrote
    assert json.loads(metrics[-1])["images"] == 80
    distributed = load_file(out / "model.safetensors")
    for key, value in single.state_dict().items():
        torch.testing.assert_close(distributed[key], value, rtol=1e-4, atol=2e-5, msg=key)
    torch.manual_seed(epoch_seed(3, -1))  # how fit seeds the initial weights
    initial = build_model(resolve_spec(spec, load_data(spec.data)).model).state_dict()
    assert (distributed["classifier.0.weight"] - initial["classifier.0.weight"]).abs().max() > 1e-4  # it trained
    assert json.loads(metrics[-1])["test_acc"] == pytest.approx(summary["test_acc"])


def test_context_reads_the_torchrun_variables_once_and_names_a_bad_one(monkeypatch):
    from topkconv import distributed

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    single = distributed.context()
    assert (single.rank, single.local_rank, single.world_size, single.is_main) == (0, 0, 1, True)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    worker = distributed.context()
    assert (worker.rank, worker.local_rank, worker.world_size, worker.is_main) == (3, 1, 4, False)
    with pytest.raises(Exception):  # frozen: passed on, never changed
        worker.rank = 0
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        distributed.context()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK=3 and WORLD_SIZE=2"):
        distributed.context()


def test_nothing_but_distributed_reads_the_torchrun_variables():
    """RANK, LOCAL_RANK and WORLD_SIZE are read in one place (topkconv.distributed.context)."""
    import pathlib
    import re

    import topkconv

    source = pathlib.Path(topkconv.__file__).parent
    pattern = re.compile(r"environ[^\n]*\b(RANK|LOCAL_RANK|WORLD_SIZE)\b")
    readers = sorted(str(path.relative_to(source)) for path in source.rglob("*.py")
                     if path.name != "distributed.py" and pattern.search(path.read_text()))
    assert readers == [], readers
