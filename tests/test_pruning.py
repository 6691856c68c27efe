"""Gradual magnitude pruning: the cubic schedule, per-layer masks by scope, frozen features, zeros that stay."""

import pytest
import torch
from torch import nn

from topkconv import pruning




class TinyNet(nn.Module):
    """The library's model layout in miniature: features -> flatten -> classifier."""

    def __init__(self, batchnorm: bool = False):
        super().__init__()
        norm = [nn.BatchNorm2d(6)] if batchnorm else []
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), *norm, nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(8 * 2 * 2, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def _zhu_gupta(t, s_i, s_f, t0, n, dt):
    return s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3


@pytest.mark.parametrize("s_i,s_f,t0,n,dt", [(0.0, 0.9, 0, 3, 1), (0.1, 0.75, 5, 4, 10)])
def test_schedule_start_middle_end(s_i, s_f, t0, n, dt):
    end = t0 + n * dt
    middle = t0 + n * dt / 2
    kw = dict(final=s_f, initial=s_i, start=t0, n_steps=n, interval=dt)
    assert pruning.cubic_sparsity(t0, **kw) == pytest.approx(s_i)
    assert pruning.cubic_sparsity(middle, **kw) == pytest.approx(_zhu_gupta(middle, s_i, s_f, t0, n, dt))
    # (1 - 1/2)^3 = 1/8 of the way back from s_f
    assert pruning.cubic_sparsity(middle, **kw) == pytest.approx(s_f + (s_i - s_f) / 8)
    assert pruning.cubic_sparsity(end, **kw) == pytest.approx(s_f)
    # outside [t0, t0 + n dt] the schedule holds its end values
    assert pruning.cubic_sparsity(t0 - 3, **kw) == pytest.approx(s_i)
    assert pruning.cubic_sparsity(end + 7, **kw) == pytest.approx(s_f)


def test_epoch_schedule_rises_to_target_before_last_epoch():
    values = [pruning.epoch_sparsity(e, 3, 0.9) for e in range(3)]
    assert values == pytest.approx([_zhu_gupta(t, 0.0, 0.9, 0, 3, 1) for t in (1, 2, 3)])
    assert values[0] < values[1] < values[2] == pytest.approx(0.9)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_schedule_rejects_bad_sparsity(bad):
    with pytest.raises(ValueError, match="final sparsity"):
        pruning.cubic_sparsity(0, final=bad)


@pytest.mark.parametrize("scope,expected", [
    ("final", ["classifier.2"]),
    ("final2", ["classifier.0", "classifier.2"]),
    ("all", ["features.0", "features.3", "classifier.0", "classifier.2"]),
])
def test_scope_selects_layers(scope, expected):
    assert list(pruning.layers_in_scope(TinyNet(), scope)) == expected


def test_bad_scope_is_named():
    with pytest.raises(ValueError, match="'last'"):
        pruning.layers_in_scope(TinyNet(), "last")
    with pytest.raises(ValueError, match="final2.*needs 2.*has 1"):
        pruning.layers_in_scope(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)), "final2")


@pytest.mark.parametrize("scope", pruning.PRUNE_SCOPES)
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_measured_sparsity_equals_target(scope, sparsity):
    torch.manual_seed(0)
    model = TinyNet()
    layers = pruning.layers_in_scope(model, scope)
    before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    pruning.prune_to(layers, sparsity * 0.5)
    pruning.prune_to(layers, sparsity)
    measured = pruning.measured_sparsity(layers)
    for name, layer in layers.items():
        numel = layer.weight.numel()
        assert measured[name] == pytest.approx(sparsity, abs=1 / numel)
        # magnitude pruning: every kept weight is at least as large as every pruned one
        kept = layer.weight_mask.bool()
        assert before[name][kept].abs().min() >= before[name][~kept].abs().max()
    # layers outside the scope are untouched
    others = set(pruning.layers_in_scope(model, "all")) - set(layers)
    for name in others:
        assert not hasattr(model.get_submodule(name), "weight_mask")


def test_masks_only_grow():
    torch.manual_seed(0)
    layers = pruning.layers_in_scope(TinyNet(), "final2")
    pruning.prune_to(layers, 0.6)
    first = {name: layer.weight_mask.clone() for name, layer in layers.items()}
    pruning.prune_to(layers, 0.3)  # a lower target never un-prunes
    for name, layer in layers.items():
        assert torch.equal(layer.weight_mask, first[name])
    with torch.no_grad():  # a pruned weight that grows large again is still pruned at the next step
        layers["classifier.2"].weight_orig[first["classifier.2"] == 0] = 100.0
    pruning.prune_to(layers, 0.8)
    assert (layers["classifier.2"].weight_mask[first["classifier.2"] == 0] == 0).all()


def _sgd_fine_tune(model, params, epochs, steps=5):
    """A stand-in fine-tuning loop on random data, so the mechanics are tested without the trainer."""
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(1)

    def fine_tune(after_epoch):
        model.train()
        for epoch in range(epochs):
            total = 0.0
            for _ in range(steps):
                x = torch.rand(16, 1, 8, 8, generator=gen)
                y = torch.randint(0, 10, (16,), generator=gen)
                loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item()
            after_epoch({"epoch": epoch + 1, "loss": total / steps})

    return fine_tune


@pytest.mark.parametrize("scope", pruning.PRUNE_SCOPES)
def test_fine_tuning_freezes_convs_and_keeps_pruned_weights_zero(scope):
    torch.manual_seed(0)
    model = TinyNet(batchnorm=True)
    model.eval()
    probe = torch.rand(4, 1, 8, 8)
    features_before = model.features(probe).detach()
    convs_before = {n: p.detach().clone() for n, p in model.features.named_parameters()}
    buffers_before = {n: b.clone() for n, b in model.features.named_buffers()}
    fc_before = {n: p.detach().clone() for n, p in model.classifier.named_parameters()}

    trainable = pruning.freeze_all_but_fc(model)
    assert {id(p) for p in trainable} == {id(p) for p in model.classifier.parameters()}
    records, masks = [], []
    layers = pruning.layers_in_scope(model, scope)

    def on_epoch(record):
        records.append(record)
        masks.append({name: layer.weight_mask.clone() for name, layer in layers.items()})

    summary = pruning.gradual_prune(model, scope, 0.8, 3, _sgd_fine_tune(model, trainable, 3), on_epoch=on_epoch)

    assert [r["target_sparsity"] for r in records] == pytest.approx(
        [pruning.epoch_sparsity(e, 3, 0.8) for e in range(3)])
    for name, layer in layers.items():
        assert not hasattr(layer, "weight_mask"), "masks must be made permanent"
        for epoch_masks in masks:  # a weight pruned at any epoch is exactly zero after fine-tuning
            assert (layer.weight[epoch_masks[name] == 0] == 0).all(), name
        assert summary["sparsity"][name] == pytest.approx(0.8, abs=1 / layer.weight.numel())
        assert float((layer.weight == 0).float().mean()) == pytest.approx(summary["sparsity"][name])
    for earlier, later in zip(records, records[1:]):
        for name in layers:
            assert later["sparsity"][name] > earlier["sparsity"][name]

    model.eval()
    for name, param in model.features.named_parameters():
        if scope == "all" and name.endswith("weight") and param.dim() == 4:
            # pruned but frozen: the kept weights are the originals
            kept = param != 0
            assert torch.equal(param[kept], convs_before[name][kept])
        else:
            assert torch.equal(param, convs_before[name]), name
    for name, buffer in model.features.named_buffers():  # BatchNorm ran in eval mode: statistics unchanged
        assert torch.equal(buffer, buffers_before[name]), name
    if scope != "all":
        assert torch.equal(model.features(probe), features_before), "frozen features changed (BatchNorm stats?)"
    assert any(not torch.equal(p, fc_before[n]) for n, p in model.classifier.named_parameters()), \
        "fine-tuning did not update the FC layers"


def test_batchnorm_runs_in_eval_mode_while_frozen():
    torch.manual_seed(0)
    model = TinyNet(batchnorm=True)
    with torch.no_grad():
        model.features[1].running_mean.uniform_(-1, 1)  # statistics that differ from any batch's
    probe = torch.rand(4, 1, 8, 8)
    expected = model.eval().features(probe)
    with pruning.frozen_normalisation(model):
        model.train()
        assert torch.equal(model.features(probe), expected)
    model.train()
    assert not torch.equal(model.features(probe), expected), "the hooks must be removed afterwards"


def test_fine_tuning_that_stops_early_is_an_error():
    model = TinyNet()
    trainable = pruning.freeze_all_but_fc(model)
    with pytest.raises(RuntimeError, match="ran 2 epochs, the schedule has 3"):
        pruning.gradual_prune(model, "final", 0.5, 3, _sgd_fine_tune(model, trainable, 2))


# ---------------------------------------------------------------- prune_run on digits (a tiny VGG)

def _tiny_spec(**defense):
    from topkconv.config import DataConfig, defense_config, ModelConfig, RunSpec, TrainConfig

    return RunSpec(name="tiny", data=DataConfig(limit_train=64, limit_test=32, image_size=16, augment=False),
                   model=ModelConfig(width=0.125, hidden=16, defense=defense_config(**defense)),
                   train=TrainConfig(epochs=1, batch_size=32, lr=0.05))


@pytest.fixture(scope="module")
def standard_run(tmp_path_factory):
    """A standard checkpoint as the trainer leaves it (weights freshly initialised: pruning needs no accuracy)."""
    from topkconv.checkpoint import save_checkpoint
    from topkconv.data import load_data
    from topkconv.models import build_model
    from topkconv.train import resolve_spec

    spec = _tiny_spec()
    resolved = resolve_spec(spec, load_data(spec.data))
    torch.manual_seed(0)
    run_dir = tmp_path_factory.mktemp("standard")
    save_checkpoint(run_dir, build_model(resolved.model), resolved, requested_hash=spec.hash())
    return run_dir


@pytest.mark.parametrize("scope", ["final2", "all"])
def test_prune_run_writes_a_sparse_checkpoint_that_reloads(standard_run, tmp_path, scope):
    import json

    from topkconv.checkpoint import load_checkpoint

    source, source_spec = load_checkpoint(standard_run)
    spec = pruning.pruned_spec(source_spec, scope, 0.75, 2)
    model, summary = pruning.prune_run(standard_run, spec, tmp_path / "pruned", progress=False)

    record = json.loads((tmp_path / "pruned" / "run.json").read_text())
    assert record["spec"]["model"]["defense"]["kind"] == "pruned"
    assert record["spec"]["model"]["defense"]["prune_scope"] == scope
    assert record["hash"] == spec.hash()
    lines = (tmp_path / "pruned" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["target_sparsity"] for line in lines] == pytest.approx(
        [pruning.epoch_sparsity(e, 2, 0.75) for e in range(2)])

    reloaded, reloaded_spec = load_checkpoint(tmp_path / "pruned")
    assert reloaded_spec.model.defense.kind == "pruned"
    layers = pruning.layers_in_scope(reloaded, scope)
    assert set(record["extra"]["sparsity"]) == set(layers)
    for name, layer in layers.items():
        numel = layer.weight.numel()
        measured = float((layer.weight == 0).sum()) / numel
        assert measured == pytest.approx(0.75, abs=1 / numel), name
        assert record["extra"]["sparsity"][name] == pytest.approx(measured)
        # the reloaded zeros are exactly the fine-tuned model's zeros
        assert torch.equal(layer.weight == 0, model.get_submodule(name).weight == 0)
    # convs frozen: outside the scope identical to the source, inside it the kept weights are the source's
    for (name, param), before in zip(reloaded.features.named_parameters(), source.features.parameters()):
        if scope == "all" and name.endswith("weight"):
            kept = param != 0
            assert torch.equal(param[kept], before[kept]), name
        else:
            assert torch.equal(param, before), name
    for (name, buffer), before in zip(reloaded.named_buffers(), source.buffers()):
        assert torch.equal(buffer, before), name
    assert not torch.equal(reloaded.classifier[0].bias, source.classifier[0].bias), "FC layers were not fine-tuned"


def test_prune_run_refuses_a_non_standard_source_and_its_own_folder(standard_run, tmp_path):
    import dataclasses

    from topkconv.checkpoint import load_checkpoint, save_checkpoint
    from topkconv.config import defense_config

    _, source_spec = load_checkpoint(standard_run)
    spec = pruning.pruned_spec(source_spec, "final", 0.5, 1)
    with pytest.raises(ValueError, match="own folder"):
        pruning.prune_run(standard_run, spec, standard_run, progress=False)
    with pytest.raises(ValueError, match="kind must be 'pruned'"):
        pruning.prune_run(standard_run, source_spec, tmp_path / "out", progress=False)
    dropout_dir = tmp_path / "dropout"
    model, _ = load_checkpoint(standard_run)
    dropout_spec = dataclasses.replace(source_spec, model=dataclasses.replace(
        source_spec.model, defense=defense_config("dropout")))
    save_checkpoint(dropout_dir, model, dropout_spec)
    with pytest.raises(ValueError, match="starts from a standard model.*'dropout'"):
        pruning.prune_run(dropout_dir, spec, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="missing"):
        pruning.prune_run(tmp_path / "missing", spec, tmp_path / "out", progress=False)


def test_prune_run_never_replaces_a_finished_run_without_force(standard_run, tmp_path):
    from topkconv.checkpoint import MODEL_FILE, RUN_FILE, STAGING_DIR, load_checkpoint

    _, source_spec = load_checkpoint(standard_run)
    out = tmp_path / "pruned"
    pruning.prune_run(standard_run, pruning.pruned_spec(source_spec, "final", 0.5, 1), out, progress=False)
    before = {name: (out / name).read_bytes() for name in (RUN_FILE, MODEL_FILE)}
    (out / "eval.json").write_text("{}")  # a result of the old weights

    other = pruning.pruned_spec(source_spec, "final", 0.75, 1)
    with pytest.raises(ValueError, match="already holds a finished run.*--force"):
        pruning.prune_run(standard_run, other, out, progress=False)
    assert {name: (out / name).read_bytes() for name in before} == before

    pruning.prune_run(standard_run, other, out, progress=False, force=True)
    _, spec = load_checkpoint(out)
    assert spec.model.defense.prune_sparsity == 0.75
    assert not (out / "eval.json").exists(), "a result of the replaced weights was left beside the new run"
    assert not (out / STAGING_DIR).exists()
