"""Gradual magnitude pruning with fine-tuning: the LWM baseline of Tables I and II.

Han et al. (2015) prune the weights of smallest magnitude; Zhu and Gupta (2017) raise the sparsity
gradually on the cubic schedule :func:`cubic_sparsity` while the network is fine-tuned. As in the
paper, fine-tuning updates only the fully connected layers; every other parameter is frozen, and
BatchNorm layers (vgg-small has them) run in eval mode, so the frozen features stay the same function.

Choices the paper leaves open, made here:

* **Per-layer masks** (``torch.nn.utils.prune.l1_unstructured`` on each layer in scope), not one global
  threshold, so every pruned layer ends with the target sparsity, which is what Table II varies.
  Only ``weight`` tensors are pruned; biases are kept.
* **One pruning step per fine-tuning epoch.** Before epoch ``e`` (0-based) of ``E`` the masks are raised
  to ``s(e + 1)`` with ``t0 = 0``, ``n = E`` and ``dt = 1``; the final sparsity is reached before the last
  epoch, which then fine-tunes the finished mask. ``s(0) = s_i`` is the trained model itself.
* Masks only grow: a new step prunes among the weights the earlier masks kept, ranked by their
  current (fine-tuned) magnitudes, so a pruned weight never returns.
* **Scopes** (Table II), in the model's module order: ``final`` is the last ``nn.Linear``; ``final2``
  the last two; ``all`` every ``nn.Conv2d`` and ``nn.Linear``. With ``all`` the convolution kernels
  are pruned but stay frozen, so nothing can compensate for the lost conv weights: on vgg-small/digits
  (clean 0.994) all layers at 0.9 fell to 0.10 and at 0.5 kept 0.967, while ``final2`` at 0.9 kept 0.989.
* The fine-tuning learning rate defaults to a tenth of the training one
  (the ``pruned`` defence's ``prune_lr`` overrides it).

At the end the masks are made permanent (``prune.remove``): the checkpoint holds plain weights with
exact zeros, loads into the standard architecture, and its ``run.json`` reports the measured sparsity
of every pruned layer under ``extra["sparsity"]``.

The options (scope, sparsity, epochs, lr) are the ``pruned`` defence's config
(:mod:`topkconv.defenses.pruned`), whose architecture is the standard one. "Pruning + LogitAug" (Table I)
is neither defined nor cited by the paper; the table specs mark it not reproduced.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from torch import nn
from torch.nn.utils import prune

from .config import RunSpec, defense_config
from .defenses.pruned import PRUNE_SCOPES

# Fine-tuning starts from a converged model; a tenth of the training rate keeps it near that optimum.
FINE_TUNE_LR_SCALE = 0.1


def cubic_sparsity(step: float, final: float, initial: float = 0.0, start: float = 0.0,
                   n_steps: int = 1, interval: float = 1.0) -> float:
    """Zhu and Gupta's schedule ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3``.

    ``step`` is ``t``, ``start`` is ``t0``, ``n_steps`` is ``n`` and ``interval`` is ``dt``. Before ``t0`` the
    sparsity is ``s_i``; after ``t0 + n dt`` it stays at ``s_f``.
    """
    _check_sparsity("initial sparsity", initial)
    _check_sparsity("final sparsity", final)
    if n_steps < 1:
        raise ValueError(f"n_steps: expected a positive number of pruning steps, got {n_steps!r}")
    if interval <= 0:
        raise ValueError(f"interval: expected a positive step interval, got {interval!r}")
    progress = (step - start) / (n_steps * interval)
    progress = min(max(progress, 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


def epoch_sparsity(epoch: int, epochs: int, final: float, initial: float = 0.0) -> float:
    """The target sparsity applied before fine-tuning epoch ``epoch`` (0-based) of ``epochs``."""
    return cubic_sparsity(epoch + 1, final, initial=initial, start=0, n_steps=epochs, interval=1)


def _check_sparsity(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a fraction in [0, 1), got {value!r}")


def check_scope(scope: str) -> str:
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"prune scope: expected one of {', '.join(PRUNE_SCOPES)}, got {scope!r}")
    return scope


def fc_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The fully connected layers, by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def layers_in_scope(model: nn.Module, scope: str) -> dict[str, nn.Module]:
    """The layers whose weights ``scope`` prunes, by qualified name, in module order."""
    check_scope(scope)
    fcs = list(fc_layers(model).items())
    if scope == "all":
        return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    wanted = 1 if scope == "final" else 2
    if len(fcs) < wanted:
        raise ValueError(f"prune scope {scope!r} needs {wanted} fully connected layers; "
                         f"the model has {len(fcs)}")
    return dict(fcs[-wanted:])


def freeze_all_but_fc(model: nn.Module) -> list[nn.Parameter]:
    """Freeze every parameter outside the ``nn.Linear`` layers; return the trainable ones.

    Pruned weights live in ``weight_orig`` under ``torch.nn.utils.prune``; the Parameter object is
    the same before and after pruning, so an optimizer built on this list keeps working.
    """
    trainable_ids = {id(p) for layer in fc_layers(model).values() for p in layer.parameters()}
    if not trainable_ids:
        raise ValueError("the model has no fully connected (nn.Linear) layer to fine-tune")
    trainable = []
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable_ids)
        if id(param) in trainable_ids:
            trainable.append(param)
    return trainable


@contextmanager
def frozen_normalisation(model: nn.Module) -> Iterator[None]:
    """Run every BatchNorm layer in eval mode while fine-tuning, whatever mode the trainer sets.

    Everything outside the ``nn.Linear`` layers is frozen, and frozen features must stay the same
    function: in train mode BatchNorm would normalise with batch statistics and keep updating its
    running ones. A forward pre-hook switches each one back to eval mode before it runs.
    """
    handles = [m.register_forward_pre_hook(_to_eval_mode) for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _to_eval_mode(module: nn.Module, args) -> None:
    module.train(False)


def prune_to(layers: dict[str, nn.Module], sparsity: float) -> None:
    """Raise each layer's weight mask to ``sparsity`` by weight magnitude (never lowers it).

    The amount is a count of weights, so each layer ends with exactly ``round(sparsity * numel)``
    masked weights.
    """
    _check_sparsity("sparsity", sparsity)
    for layer in layers.values():
        mask = getattr(layer, "weight_mask", None)
        masked = 0 if mask is None else int((mask == 0).sum())
        extra = int(round(sparsity * layer.weight.numel())) - masked
        if mask is None or extra > 0:
            # amount=0 still installs the (all-ones) mask, so every layer in scope is parametrised alike.
            prune.l1_unstructured(layer, "weight", amount=max(extra, 0))


def measured_sparsity(layers: dict[str, nn.Module]) -> dict[str, float]:
    """The fraction of exactly-zero weights in each layer (with any mask applied)."""
    out = {}
    for name, layer in layers.items():
        if hasattr(layer, "weight_mask"):
            # ``layer.weight`` is only refreshed by a forward pass; the mask and the original are current.
            weight = layer.weight_orig.detach() * layer.weight_mask
        else:
            weight = layer.weight.detach()
        out[name] = float((weight == 0).sum()) / weight.numel()
    return out


def make_permanent(layers: dict[str, nn.Module]) -> None:
    """Fold the masks into the weights (``prune.remove``) so the state_dict is the plain layout."""
    for layer in layers.values():
        if hasattr(layer, "weight_mask"):
            prune.remove(layer, "weight")


def gradual_prune(model: nn.Module, scope: str, sparsity: float, epochs: int,
                  fine_tune: Callable[[Callable[[dict], None]], object], initial: float = 0.0,
                  on_epoch: Optional[Callable[[dict], None]] = None) -> dict:
    """Prune ``model`` in place on the cubic schedule while fine-tuning, then make the masks permanent.

    ``fine_tune(after_epoch)`` runs ``epochs`` fine-tuning epochs and calls ``after_epoch(metrics)`` after
    each, e.g. ``lambda hook: train.train_epochs(..., epochs=epochs, on_epoch=hook)``; it is built on the
    trainable parameters of :func:`freeze_all_but_fc` (call that first). One optimizer and learning-rate
    schedule thus span all epochs, and the hook raises the masks before the next epoch starts.
    ``on_epoch`` receives one record per epoch: the metrics plus the scheduled and measured sparsity.
    Returns ``{"scope", "target", "sparsity": {layer: measured}, "history": [records]}``.
    """
    check_scope(scope)
    _check_sparsity("sparsity", sparsity)
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs: expected at least one fine-tuning epoch, got {epochs!r}")
    layers = layers_in_scope(model, scope)
    history: list[dict] = []

    def after_epoch(metrics: dict) -> None:
        epoch = len(history)
        record = {**metrics, "target_sparsity": epoch_sparsity(epoch, epochs, sparsity, initial),
                  "sparsity": measured_sparsity(layers)}
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if epoch + 1 < epochs:
            prune_to(layers, epoch_sparsity(epoch + 1, epochs, sparsity, initial))

    prune_to(layers, epoch_sparsity(0, epochs, sparsity, initial))
    with frozen_normalisation(model):
        fine_tune(after_epoch)
    if len(history) != epochs:
        raise RuntimeError(f"fine-tuning ran {len(history)} epochs, the schedule has {epochs}")
    make_permanent(layers)
    return {"scope": scope, "target": sparsity, "sparsity": measured_sparsity(layers), "history": history}


def pruned_spec(source: RunSpec, scope: str, sparsity: float, epochs: int,
                lr: Optional[float] = None, name: Optional[str] = None) -> RunSpec:
    """The spec of a pruned copy of the standard run ``source``: its data, model and training, plus pruning."""
    check_scope(scope)
    _check_sparsity("sparsity", sparsity)
    defense = defense_config("pruned", prune_scope=scope, prune_sparsity=float(sparsity), prune_epochs=epochs,
                             prune_lr=lr)
    model = dataclasses.replace(source.model, defense=defense)
    return dataclasses.replace(source, model=model, name=name or f"{source.name}-pruned-{scope}")


def _model_without_defense(spec: RunSpec) -> dict:
    fields = dataclasses.asdict(spec.model)
    fields.pop("defense")
    return fields


def prune_run(source, spec: RunSpec, out_dir, progress: bool = True, force: bool = False) -> tuple[nn.Module, dict]:
    """Prune the trained standard run ``source`` as ``spec.model.defense`` says, into ``out_dir``.

    ``spec`` is the pruned run's spec (the defence ``"pruned"``; :func:`pruned_spec` makes one from the
    source's). Fine-tuning reuses :func:`topkconv.train.train_epochs` on ``spec.train``'s optimizer
    settings (no warm-up, cosine or step over the pruning epochs). Writes ``out_dir/model.safetensors``,
    ``run.json`` (``extra["sparsity"]``: measured sparsity per pruned layer; ``extra["prune"]``: the
    summary) and ``metrics.jsonl``; returns ``(model in eval mode, summary)``.
    """
    from . import distributed, train
    from .checkpoint import output_folder, replace_run, save_checkpoint
    from .data import load_data

    model, source_spec, source_dir, source_hash = _load_source(source, spec, Path(out_dir))
    splits = load_data(spec.data)
    resolved = train.resolve_spec(spec, splits)
    if _model_without_defense(resolved) != _model_without_defense(source_spec):
        raise ValueError(f"{source_dir}: its model ({_model_without_defense(source_spec)}) differs from the "
                         f"one spec {spec.name!r} describes ({_model_without_defense(resolved)})")
    process = distributed.context()
    writes = process.is_main  # under torchrun every rank computes the same; one writes
    work_dir, replacing = output_folder(Path(out_dir), force, writes, "prune")
    device = distributed.pick_device(spec.train.device, process.local_rank)
    model.to(device)
    start = time.perf_counter()
    acc_before = train.evaluate_accuracy(model, splits.test, batch_size=spec.train.batch_size, device=device,
                                         limit=spec.train.eval_examples)
    result, lr = _prune_and_fine_tune(model, spec, splits, source_spec.train.epochs, device, progress,
                                      work_dir if writes else None)
    defense = spec.model.defense
    summary = {
        "source": {"run_dir": str(source_dir), "hash": source_hash},
        "scope": defense.prune_scope, "target_sparsity": defense.prune_sparsity, "epochs": defense.prune_epochs,
        "lr": lr, "sparsity": result["sparsity"], "test_acc_before": acc_before,
        "test_acc": result["history"][-1]["test_acc"], "seconds": round(time.perf_counter() - start, 3),
        "device": str(device), "complete": True,
    }
    if writes:
        save_checkpoint(work_dir, model, resolved, extra={"sparsity": result["sparsity"], "prune": summary},
                        requested_hash=spec.hash())
        if replacing:
            replace_run(Path(out_dir), work_dir)
    return model.eval(), summary


def _load_source(source, spec: RunSpec, out_dir: Path) -> tuple[nn.Module, RunSpec, Path, Optional[str]]:
    """The source run's model, spec, folder and hash, after checking that ``spec`` prunes and that the source
    is a standard run in another folder."""
    from .checkpoint import load_checkpoint, read_run_json
    from .train import check_train_config

    defense = spec.model.defense
    if defense.kind != "pruned":
        raise ValueError(f"spec {spec.name!r}: model.defense.kind must be 'pruned' to prune, got {defense.kind!r}")
    dataclasses.replace(defense)  # re-runs the config's own checks of scope, sparsity, epochs and lr
    check_train_config(spec.train)
    model, source_spec = load_checkpoint(source)  # errors name the missing or broken file
    source_dir = Path(source) if Path(source).is_dir() else Path(source).parent
    source_hash = read_run_json(source_dir).get("hash")
    if out_dir.resolve() == source_dir.resolve():
        raise ValueError(f"--out {out_dir}: the pruned run needs its own folder, not the source run's")
    if source_spec.model.defense.kind != "standard":
        raise ValueError(f"{source_dir}: pruning starts from a standard model; this run's defense is "
                         f"{source_spec.model.defense.kind!r}")
    return model, source_spec, source_dir, source_hash


def _prune_and_fine_tune(model: nn.Module, spec: RunSpec, splits, source_epochs: int, device, progress: bool,
                         metrics_dir: Optional[Path]) -> tuple[dict, float]:
    """Run :func:`gradual_prune` with :func:`topkconv.train.train_epochs` as the fine-tuning; returns its
    result and the fine-tuning learning rate. Each epoch's record goes to ``metrics_dir`` (when given)."""
    from . import train
    from .checkpoint import METRICS_FILE
    from .io import append_jsonl

    defense = spec.model.defense
    lr = defense.prune_lr if defense.prune_lr is not None else FINE_TUNE_LR_SCALE * spec.train.lr
    fine_tune_cfg = dataclasses.replace(spec.train, warmup_epochs=0.0)
    trainable = freeze_all_but_fc(model)

    def fine_tune(after_epoch):
        # Epochs continue the source run's seeded stream, so fine-tuning sees fresh shuffles.
        return train.train_epochs(model, splits, fine_tune_cfg, params=trainable, lr=lr,
                                  epochs=defense.prune_epochs, augment=spec.data.augment, device=device,
                                  progress=progress, eval_limit=spec.train.eval_examples, on_epoch=after_epoch,
                                  first_epoch=source_epochs)

    def log_epoch(record):
        if metrics_dir is not None:
            append_jsonl(metrics_dir / METRICS_FILE, record)
        if progress:
            mean = sum(record["sparsity"].values()) / len(record["sparsity"])
            print(f"prune epoch {record['epoch']}/{defense.prune_epochs}: sparsity {mean:.3f}, loss "
                  f"{record['loss']:.4f}, test acc {record['test_acc']:.4f}", file=sys.stderr)

    result = gradual_prune(model, defense.prune_scope, defense.prune_sparsity, defense.prune_epochs, fine_tune,
                           on_epoch=log_epoch)
    for param in model.parameters():
        param.requires_grad_(True)
    return result, lr
