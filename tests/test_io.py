import json
import os

import pytest
import torch
from safetensors.torch import load_file

from topkconv.io import (append_jsonl, atomic_save_safetensors, atomic_write_bytes, atomic_write_csv,
                         atomic_write_json, atomic_write_text, environment_info)


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


def test_csv_rows_keep_the_first_rows_column_order_and_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "rows.csv"
    atomic_write_csv(target, [{"b": 1, "a": "x,y"}, {"b": 2, "a": None}])
    assert target.read_text() == 'b,a\n1,"x,y"\n2,\n'
    with pytest.raises(ValueError):  # a key the header lacks
        atomic_write_csv(target, [{"b": 1}, {"c": 2}])
    assert target.read_text().startswith("b,a\n") and [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


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


def test_a_toml_file_that_is_not_utf8_is_named(tmp_path):
    from topkconv.io import read_toml

    path = tmp_path / "spec.toml"
    path.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"spec\.toml: not UTF-8 text \(invalid continuation byte at byte 11\)"):
        read_toml(path)


def test_check_writable_file_refuses_a_folder_and_an_unwritable_place_and_leaves_nothing(tmp_path):
    from topkconv.io import check_writable_file

    with pytest.raises(ValueError, match="--out .*is a folder"):
        check_writable_file(tmp_path, "--out")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="--out .*a-file/eval.json: cannot write there"):
        check_writable_file(tmp_path / "a-file" / "eval.json", "--out")
    target = check_writable_file(tmp_path / "new" / "eval.json")
    assert target.parent.is_dir() and not target.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a-file", "new"]


def test_a_failed_write_names_the_file(tmp_path, monkeypatch):
    import errno

    from topkconv.errors import one_line

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError) as caught:
        atomic_write_bytes(tmp_path / "model.safetensors", b"weights")
    assert one_line(caught.value) == f"{tmp_path / 'model.safetensors'}: No space left on device"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_mode_plain_open_would(tmp_path, umask, mode):
    before = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        atomic_save_safetensors(tmp_path / "w.safetensors", {"w": torch.zeros(2)})
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("x")
    finally:
        os.umask(before)
    for name in ("a.json", "w.safetensors", "plain.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
