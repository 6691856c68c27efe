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

from .errors import UserError, one_line


def import_factory(spec: str):
    """The callable named by ``"package.module:factory"`` or ``"path/to/file.py:factory"``."""
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise UserError(f"--model {spec!r}: expected 'package.module:factory' or 'path/to/file.py:factory'")
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
        raise UserError(f"--model {spec!r}: cannot import {module_name!r}: {type(error).__name__}: "
                        f"{one_line(error)}") from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise UserError(f"--model {spec!r}: {module_name!r} has no callable {attribute!r}")
    return factory


def load_weights(model: nn.Module, weights) -> nn.Module:
    """Load a safetensors state dict into ``model`` (strict); errors name the file and what did not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(weights)
    if path.suffix in (".pt", ".pth", ".pkl", ".bin", ".ckpt"):
        raise UserError(f"--weights {path}: only safetensors files are read (a {path.suffix} file may be a "
                         f"pickle, which can run code); convert it with safetensors.torch.save_file")
    if path.is_dir():
        raise UserError(f"--weights {path}: is a folder; expected a safetensors file (a run folder is evaluated "
                        f"with `topkconv evaluate RUN_FOLDER`, without --model)")
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"--weights {path}: not a readable safetensors file ({error})") from error
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UserError(f"--weights {path}: the weights do not fit the model: {error}") from error
    return model


def build_user_model(spec: str, weights) -> nn.Module:
    """``factory()`` from ``spec``, with the safetensors ``weights`` loaded, in eval mode."""
    factory = import_factory(spec)
    try:
        model = factory()
    except Exception as error:  # noqa: BLE001 - the user's code: any failure is named, in one line
        raise UserError(f"--model {spec!r}: calling {_name(factory)}() failed: {type(error).__name__}: "
                        f"{one_line(error)} (the factory is called with no arguments)") from error
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {spec!r}: {_name(factory)}() returned {type(model).__name__}, expected an "
                        f"nn.Module")
    return load_weights(model, weights).eval()


def _name(factory) -> str:
    return getattr(factory, "__qualname__", None) or getattr(factory, "__name__", None) or repr(factory)
