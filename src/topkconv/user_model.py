"""A user's own model for ``topkconv evaluate --model package.module:factory --weights file.safetensors``.

The model is built by calling ``factory()`` from the user's code (a module on the import path, or a
``path/to/file.py``), then its weights are loaded from a safetensors file. No pickle is ever loaded: the
weights format holds tensors only, so a weights file cannot run code.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from torch import nn


def import_factory(spec: str):
    """The callable named by ``"package.module:factory"`` or ``"path/to/file.py:factory"``."""
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"--model {spec!r}: expected 'package.module:factory' or 'path/to/file.py:factory'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise FileNotFoundError(f"no such file {path}")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules.setdefault(path.stem, module)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any failure of the user's import is reported the same way
        raise ValueError(f"--model {spec!r}: cannot import {module_name!r}: {type(error).__name__}: {error}") from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"--model {spec!r}: {module_name!r} has no callable {attribute!r}")
    return factory


def load_weights(model: nn.Module, weights) -> nn.Module:
    """Load a safetensors state dict into ``model`` (strict); errors name the file and what did not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(weights)
    if path.suffix in (".pt", ".pth", ".pkl", ".bin", ".ckpt"):
        raise ValueError(f"--weights {path}: only safetensors files are read (a {path.suffix} file may be a "
                         f"pickle, which can run code); convert it with safetensors.torch.save_file")
    if not path.is_file():
        raise ValueError(f"--weights {path}: no such file")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"--weights {path}: not a readable safetensors file ({error})") from error
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"--weights {path}: the weights do not fit the model: {error}") from error
    return model


def build_user_model(spec: str, weights) -> nn.Module:
    """``factory()`` from ``spec``, with the safetensors ``weights`` loaded, in eval mode."""
    model = import_factory(spec)()
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec!r}: the factory returned {type(model).__name__}, expected an nn.Module")
    return load_weights(model, weights).eval()
