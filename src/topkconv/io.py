"""Atomic file writes and the environment record every run stores.

Every artefact goes through these helpers: the data is written to a temporary file in the target's
folder, flushed to disk, then renamed over the target with ``os.replace``. A reader (or a run killed
half-way) therefore sees either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Mapping, Union

from .errors import UserError

PathLike = Union[str, os.PathLike]


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the target: os.replace is only atomic within one file system.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 less the umask), so that
        # colleagues can read a shared results folder.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError) and err.filename is None:  # a full disk: say which file could not be written
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (the only portable way to read it)
    os.umask(mask)
    return mask


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """JSON with sorted keys and a trailing newline, so reruns give byte-identical files."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_write_csv(path: PathLike, rows: list) -> None:
    """Rows (dicts with the same keys, the first row's order) as CSV with a header, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def atomic_save_safetensors(path: PathLike, tensors: Mapping[str, Any], metadata: dict | None = None) -> None:
    """Save a flat ``{name: tensor}`` dict as safetensors, atomically.

    Tensors are made contiguous and moved to the CPU first; safetensors refuses shared or strided storage.
    """
    from safetensors.torch import save

    flat = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write_bytes(path, save(flat, metadata=metadata))


def append_jsonl(path: PathLike, obj: Any) -> None:
    """Append one JSON line. A line is written with one ``write`` call and flushed to disk.

    Appending cannot be made atomic by renaming; a single small write is the next best thing, and a
    torn last line (a crash mid-write) is the only failure a reader has to tolerate.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(obj, sort_keys=True, default=_json_default) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def _parse_file(path: PathLike, what: str, kind: str, parse, error: type) -> Any:
    """Read and parse a text file; a missing file or a parse error is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save the {kind} file as "
                        f"UTF-8") from None
    try:
        return parse(text)
    except error as err:
        raise UserError(f"{path}: not valid {kind}: {err}") from None


def read_json(path: PathLike, what: str = "file") -> Any:
    """Parse a JSON file; a missing file or invalid JSON is an error naming the file."""
    return _parse_file(path, what, "JSON", json.loads, json.JSONDecodeError)


def read_toml(path: PathLike, what: str = "file") -> dict:
    """Parse a TOML file; a missing file or invalid TOML is an error naming the file."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser, published as tomli
        import tomli as tomllib
    return _parse_file(path, what, "TOML", tomllib.loads, tomllib.TOMLDecodeError)


def check_writable_file(path: PathLike, what: str = "output file") -> Path:
    """Fail before any compute if ``path`` cannot be written: it names a folder, or its folder cannot be
    created or written. Creates the folder; leaves no file behind. Returns ``path`` as a Path."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path}: is a folder; expected a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"{what} {path}: cannot write there ({err.strerror or err})") from None
    return path


def environment_info() -> dict:
    """What produced a result: torch version, git commit (or None), device, CPU count, platform.

    The platform string leaves out the host name on purpose: run records get shared.
    """
    import torch

    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "device": device,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": f"{platform.system()}-{platform.release()}-{platform.machine()}",
    }


def _git_commit() -> str | None:
    source_dir = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source_dir, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def _json_default(obj: Any):
    # numpy scalars and paths show up in metrics and specs; anything else is a bug worth an error.
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")
