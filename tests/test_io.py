import json
import os

import pytest
import torch
from safetensors.torch import load_file

from topkconv.io import (append_jsonl, atomic_save_safetensors, atomic_write_bytes, atomic_write_json,
                         atomic_write_text, environment_info)


def test_atomic_writes_replace_and_leave_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    atomic_write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2], "b": 1}
    leftovers = [p for p in os.listdir(tmp_path) + os.listdir(tmp_path / "sub") if p.endswith(".tmp")]
    assert leftovers == []


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "j.json"
    atomic_write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_safetensors_roundtrip_of_non_contiguous_tensors(tmp_path):
    w = torch.arange(12.0).reshape(3, 4).t()  # a transposed view is not contiguous
    atomic_save_safetensors(tmp_path / "m.safetensors", {"w": w, "b": torch.ones(2, dtype=torch.int64)})
    loaded = load_file(tmp_path / "m.safetensors")
    assert torch.equal(loaded["w"], w) and torch.equal(loaded["b"], torch.ones(2, dtype=torch.int64))


def test_append_jsonl_appends_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"epoch": 1})
    append_jsonl(path, {"epoch": 2, "acc": torch.tensor(0.5)})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"epoch": 1}, {"epoch": 2, "acc": 0.5}]


def test_environment_info_has_no_hostname():
    import socket

    info = environment_info()
    assert info["torch"] == torch.__version__
    assert info["cpu_count"] >= 1
    assert socket.gethostname() not in json.dumps(info)
