"""What every attack shares: eval mode for the duration of an attack, the model's device, and accuracy.

Conventions (torchattacks, foolbox, RobustBench): inputs are images in [0, 1] with normalisation inside
the model; the model is in eval mode during an attack and every module's mode is restored afterwards,
even when the attack raises; tensors follow the device of the model's parameters.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch
from torch import nn

# The traces of the iterative attacks that run inside a :func:`recording_traces` block (None outside one).
_RECORDER: contextvars.ContextVar = contextvars.ContextVar("attack_traces", default=None)


@contextlib.contextmanager
def recording_traces() -> Iterator[list]:
    """Inside the block every iterative attack that keeps a loss trace (PGD and its variants, the BPDA
    stand-ins, the zeroth-order attack) records it: the yielded list receives one trace per attack call, a
    list of ``{"loss": (B,), "fooled": (B,)}`` records, one per iterate. The masking indicators read the
    traces of the attacks an evaluation reports (Pintor et al. 2022's silent success and incomplete
    optimisation) without every attack's run function passing a trace along."""
    traces: list = []
    token = _RECORDER.set(traces)
    try:
        yield traces
    finally:
        _RECORDER.reset(token)


def trace_for(trace: Optional[list]) -> Optional[list]:
    """The trace an attack call appends to: the caller's ``trace``, else a new one in the active
    :func:`recording_traces` block (None outside one: nothing is recorded)."""
    recorder = _RECORDER.get()
    if trace is not None or recorder is None:
        return trace
    recorder.append([])
    return recorder[-1]



def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def query_layout(model: nn.Module) -> Iterator[None]:
    """On CPU, the model's 4-D parameters and buffers (convolution weights) in channels-last memory inside the
    block, and the very tensors they held before restored on the way out (no copy back, nothing else changed).

    oneDNN then runs the convolutions, batch norms and poolings in its native NHWC order instead of converting
    every activation in and out of it: on the quick models PGD's steps ran 1.05-1.3x faster and, with calls of
    256 inputs, the zeroth-order attack's queries 1.6-2.0x (SAP's PGD 0.93x: its flattening copies; BENCHMARKS.md,
    "Attack queries in channels-last memory"). The values are the same up to float rounding, so the attacks that
    query a model thousands of times use it; predictions and accuracies keep the model's own layout."""
    if model_device(model).type != "cpu":
        yield
        return
    kept = []
    with torch.no_grad():  # new storage for the same values; .data keeps each Parameter object (and sharing)
        for tensor in {id(t): t for t in (*model.parameters(), *model.buffers())}.values():
            if tensor.dim() == 4 and not tensor.is_contiguous(memory_format=torch.channels_last):
                kept.append((tensor, tensor.data))
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for tensor, data in kept:
            tensor.data = data


@contextlib.contextmanager
def attack_mode(model: nn.Module, fast_queries: bool = False) -> Iterator[torch.device]:
    """Eval mode inside the block; each module's own train/eval flag restored on the way out.

    Restoring per module (not ``model.train(previous)``) keeps mixed states intact, e.g. a frozen,
    eval-mode backbone inside a model that is otherwise training. ``fast_queries``: the model in
    :func:`query_layout` inside the block too (the query-heavy attacks).
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with query_layout(model) if fast_queries else contextlib.nullcontext():
            yield model_device(model)
    finally:
        for module, training in flags:
            module.training = training


def check_inputs(x: torch.Tensor, y: torch.Tensor, eps: Optional[float] = None) -> None:
    """Clear errors for the mistakes that otherwise give silently wrong robust accuracies."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor of images in [0, 1], got {type(x).__name__}"
                         + (f" of {x.dtype}" if torch.is_tensor(x) else ""))
    if not torch.is_tensor(y) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y: expected a 1-D label tensor of length {x.shape[0]} (the batch of x), "
                         f"got {tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"x: expected images in [0, 1] (normalise inside the model), "
                         f"got values in [{x.min().item():.3g}, {x.max().item():.3g}]")
    if eps is not None and not (0.0 <= eps <= 1.0):
        raise ValueError(f"eps: expected a fraction of the [0, 1] range in [0, 1] "
                         f"(the API takes 8/255, not 8), got {eps}")


def uniform_start(x: torch.Tensor, eps: float, low: torch.Tensor, high: torch.Tensor,
                  generator: Optional[torch.Generator]) -> torch.Tensor:
    """A random start: ``x`` plus uniform noise in [-eps, eps], clamped to [low, high] (the eps-ball within
    [0, 1]); the noise drawn by ``generator`` on its own device (the global generator when None)."""
    device = generator.device if generator is not None else x.device
    noise = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    return torch.clamp(x + (2 * noise - 1) * eps, low, high)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: Optional[int] = None) -> torch.Tensor:
    """Predicted labels, on the model's device, in eval mode, in batches of ``batch_size``."""
    with attack_mode(model) as device:
        step = batch_size or max(1, x.shape[0])
        labels = [model(x[i:i + step].to(device)).argmax(1) for i in range(0, x.shape[0], step)]
    return torch.cat(labels) if labels else torch.empty(0, dtype=torch.long, device=device)


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: Optional[int] = None) -> torch.Tensor:
    """Boolean mask: which examples the model classifies correctly."""
    labels = predict(model, x, batch_size)
    return labels == y.to(labels.device)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: Optional[int] = None) -> float:
    """Fraction of ``x`` classified as ``y`` (eval mode, model's device)."""
    mask = correct(model, x, y, batch_size)
    return mask.float().mean().item() if mask.numel() else float("nan")


@torch.no_grad()
def logit_change(model: nn.Module, x: torch.Tensor, passes: int) -> float:
    """The largest L2 change of an example's logits, relative to their norm, over ``passes`` forward passes
    of the same inputs in eval mode: 0 for a deterministic model. The one randomness test (AutoAttack's
    ``check_randomized``), used by the randomness indicator and by the plan's choice of EOT."""
    if x.numel() == 0 or passes < 2:
        return 0.0
    with attack_mode(model) as device:
        x = x.to(device)
        first = model(x)
        norm = torch.linalg.vector_norm(first, dim=1).clamp_min(1e-12)
        return max((torch.linalg.vector_norm(model(x) - first, dim=1) / norm).max().item()
                   for _ in range(passes - 1))


def is_routing_layer(module: nn.Module) -> bool:
    """Whether ``module`` exposes its routing (a ``selection_mask(x)`` method, as every routing layer does)."""
    return callable(getattr(module, "selection_mask", None))


def routing_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer of ``model`` that can report its selection (has ``selection_mask``)."""
    return [(name, module) for name, module in model.named_modules() if is_routing_layer(module)]


def _generator_holders(model: nn.Module) -> list[nn.Module]:
    """The modules that draw from their own ``generator`` attribute (a random layer such as SAP)."""
    return [module for module in model.modules()
            if hasattr(module, "generator") and (module.generator is None
                                                 or isinstance(module.generator, torch.Generator))]


@contextlib.contextmanager
def seeded(model: nn.Module, seed: int) -> Iterator[torch.Generator]:
    """Fix every random draw of an attack to ``seed``; yields a generator on the model's device.

    Inside the block torch's global generators are seeded (and restored afterwards) and every layer with a
    ``generator`` attribute (a random layer such as SAP) draws from its own generator seeded from ``seed``
    (its previous generator is put back), so an attack on the same examples gives the same numbers wherever
    and in whatever order it runs.
    """
    device = model_device(model)
    saps = _generator_holders(model)
    previous = [layer.generator for layer in saps]
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for index, layer in enumerate(saps):  # distinct streams, so layers do not drop alike
            layer.generator = torch.Generator(device=device).manual_seed(seed + 1 + index)
        try:
            yield torch.Generator(device=device).manual_seed(seed)
        finally:
            for layer, generator in zip(saps, previous):
                layer.generator = generator
