import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from topkconv.config import DataConfig
from topkconv.data import AugmentParams, load_data, plan_epoch
from topkconv.data.folders import CINIC_CLASSES


# ---------------------------------------------------------------- digits

def test_digits_split_is_fixed_stratified_and_in_unit_range():
    a = load_data(DataConfig(name="digits"))
    b = load_data(DataConfig(name="digits"))
    c = load_data(DataConfig(name="digits", split_seed=1))
    assert (len(a.train), len(a.test)) == (1437, 360)
    assert (a.num_classes, a.in_channels, a.image_size) == (10, 1, 32)
    x, y = a.test_tensors()
    assert x.shape == (360, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    assert torch.equal(y, b.test_tensors()[1]) and not torch.equal(y, c.test_tensors()[1])
    counts = torch.bincount(y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of ~180 per class
    assert len(a.mean) == len(a.std) == 1 and 0.1 < a.mean[0] < 0.5
    small = load_data(DataConfig(name="digits", image_size=16, limit_train=100, limit_test=7))
    assert small.test_tensors()[0].shape == (7, 1, 16, 16) and len(small.train) == 100


def test_batches_cover_the_split_and_shuffle_by_generator():
    data = load_data(DataConfig(name="digits", limit_train=200))
    seen = []
    for x, y in data.train.batches(64, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert x.shape[1:] == (1, 32, 32)
        seen.append(y)
    again = torch.cat([y for _, y in data.train.batches(64, shuffle=True,
                                                         generator=torch.Generator().manual_seed(0))])
    assert torch.equal(torch.cat(seen), again)
    assert sorted(torch.cat(seen).tolist()) == sorted(data.train.labels.tolist())


def test_rank_shares_rebuild_the_global_batches():
    one = plan_epoch(10, 4, shuffle=True, augment=True, image_size=8, flip=True,
                     generator=torch.Generator().manual_seed(3))
    shares = [plan_epoch(10, 4, shuffle=True, augment=True, image_size=8, flip=True,
                         generator=torch.Generator().manual_seed(3), rank=r, world_size=2) for r in range(2)]
    assert [len(p.indices) for p in one] == [4, 4, 2]
    for whole, r0, r1 in zip(one, *shares):
        assert sorted(whole.indices.tolist()) == sorted(r0.indices.tolist() + r1.indices.tolist())
        assert torch.equal(whole.augment.dy[0::2], r0.augment.dy) and torch.equal(whole.augment.dx[1::2], r1.augment.dx)
    with pytest.raises(ValueError, match="batch_size"):
        plan_epoch(10, 3, shuffle=False, augment=False, image_size=8, flip=True, generator=None, world_size=2)


def test_augmentation_crops_and_flips_each_image_by_its_own_draw():
    x = torch.rand(3, 2, 8, 8)
    params = AugmentParams(3, 8, torch.Generator().manual_seed(0))
    params.dy[:] = torch.tensor([1, 0, 2])  # pad is 1 at 8 px: offset 1 is the identity
    params.dx[:] = torch.tensor([1, 2, 1])
    params.flip[:] = torch.tensor([False, False, True])
    out = params.apply(x)
    torch.testing.assert_close(out[0], x[0])
    torch.testing.assert_close(out[1, :, 1:, :-1], x[1, :, :-1, 1:])  # moved down-left by one pixel
    torch.testing.assert_close(out[2, :, :-1], x[2, :, 1:].flip(-1))
    same = AugmentParams(3, 8, torch.Generator().manual_seed(5)).apply(x)
    torch.testing.assert_close(same, AugmentParams(3, 8, torch.Generator().manual_seed(5)).apply(x))


def test_unknown_data_set_and_bad_limits_are_named():
    with pytest.raises(ValueError, match="data.name"):
        load_data(DataConfig(name="mnist"))
    with pytest.raises(ValueError, match="limit_train"):
        load_data(DataConfig(limit_train=0))


# ---------------------------------------------------------------- CIFAR-10 pickles

def write_cifar(root, per_file=6, bytes_keys=True):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, per_file))
        batch = {b"data": data, b"labels": labels} if bytes_keys else {"data": data, "labels": labels}
        (root / name).write_bytes(pickle.dumps(batch))
        files[name] = (data, labels)
    return files


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar10_loads_channel_major_pickles(tmp_path, bytes_keys):
    files = write_cifar(tmp_path / "cifar", bytes_keys=bytes_keys)
    data = load_data(DataConfig(name="cifar10", root=str(tmp_path / "cifar")))
    assert (len(data.train), len(data.test), data.in_channels, data.classes[0]) == (30, 6, 3, "airplane")
    x, y = data.test_tensors()
    raw, labels = files["test_batch"]
    expected = torch.from_numpy(raw.reshape(-1, 3, 32, 32)).float() / 255
    torch.testing.assert_close(x, expected)
    assert y.tolist() == [int(v) for v in labels]
    all_train = np.concatenate([files[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 1024)
    assert data.mean == pytest.approx((all_train / 255).mean(axis=(0, 2)).tolist(), abs=1e-5)
    resized = load_data(DataConfig(name="cifar10", root=str(tmp_path / "cifar"), image_size=48))
    assert resized.test_tensors(2)[0].shape == (2, 3, 48, 48)


def test_cifar10_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        load_data(DataConfig(name="cifar10", root=str(tmp_path / "nothing")))
    with pytest.raises(ValueError, match="data.root"):
        load_data(DataConfig(name="cifar10"))
    root = tmp_path / "cifar"
    write_cifar(root)
    (root / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_data(DataConfig(name="cifar10", root=str(root)))
    (root / "data_batch_3").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="data_batch_3.*dict"):
        load_data(DataConfig(name="cifar10", root=str(root)))
    (root / "data_batch_3").write_bytes(b"garbage, not a pickle")
    with pytest.raises(ValueError, match="data_batch_3.*not a CIFAR-10 pickle"):
        load_data(DataConfig(name="cifar10", root=str(root)))
    (root / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"data_batch_3.*\(N, 3072\)"):
        load_data(DataConfig(name="cifar10", root=str(root)))


# ---------------------------------------------------------------- CINIC-10 and image folders

def write_tree(root, classes, per_class=2, size=32, seed=0):
    rng = np.random.default_rng(seed)
    pixels = {}
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            path = root / name / f"img{i}.png"
            Image.fromarray(array).save(path)
            pixels[path] = array
    return pixels


def test_cinic10_streams_png_trees_with_workers(tmp_path):
    pixels = write_tree(tmp_path / "cinic" / "test", CINIC_CLASSES, per_class=1)
    write_tree(tmp_path / "cinic" / "train", CINIC_CLASSES, per_class=2, seed=1)
    data = load_data(DataConfig(name="cinic10", root=str(tmp_path / "cinic"), workers=1))
    assert (len(data.train), len(data.test), data.num_classes) == (20, 10, 10)
    assert data.mean[0] == pytest.approx(0.47889522)
    x, y = data.test_tensors()
    assert x.shape == (10, 3, 32, 32)
    for image, label, path in zip(x, y, data.test.dataset.files):
        assert CINIC_CLASSES[label] == path.parent.name
        torch.testing.assert_close(image, torch.from_numpy(pixels[path]).permute(2, 0, 1).float() / 255)
    batches = list(data.train.batches(8, shuffle=True, augment=True, generator=torch.Generator().manual_seed(0)))
    assert [len(b[1]) for b in batches] == [8, 8, 4] and batches[0][0].shape == (8, 3, 32, 32)


def test_cinic10_errors_name_the_folder_or_file(tmp_path):
    root = tmp_path / "cinic"
    with pytest.raises(FileNotFoundError, match="cinic"):
        load_data(DataConfig(name="cinic10", root=str(root)))
    write_tree(root / "train", CINIC_CLASSES, per_class=1)
    write_tree(root / "test", CINIC_CLASSES[:-1], per_class=1)
    with pytest.raises(FileNotFoundError, match="test/truck"):
        load_data(DataConfig(name="cinic10", root=str(root)))
    (root / "test" / "truck").mkdir()
    with pytest.raises(ValueError, match="empty.*test/truck"):
        load_data(DataConfig(name="cinic10", root=str(root)))
    (root / "test" / "truck" / "broken.png").write_bytes(b"\x89PNG not really")
    data = load_data(DataConfig(name="cinic10", root=str(root), workers=0))
    with pytest.raises(ValueError, match="broken.png"):
        data.test_tensors()


def test_imagefolder_splits_a_class_tree_and_resizes(tmp_path):
    write_tree(tmp_path / "pets", ["cat", "dog", "eel"], per_class=5, size=20)
    data = load_data(DataConfig(name="imagefolder", root=str(tmp_path / "pets"), image_size=24, workers=0))
    assert data.classes == ["cat", "dog", "eel"]
    assert (len(data.train), len(data.test)) == (12, 3)
    x, y = data.test_tensors()
    assert x.shape == (3, 3, 24, 24) and sorted(y.tolist()) == [0, 1, 2]
    assert 0.3 < data.mean[0] < 0.7
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        load_data(DataConfig(name="imagefolder", root=str(tmp_path / "none")))


class PlantsAFolder:
    """Unpickling this creates a folder: the code a pickle can carry."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import os

        return (os.mkdir, (self.target,))


@pytest.mark.parametrize("planted_in", ["data_batch_2", "batches.meta"])
def test_cifar10_pickles_that_carry_code_are_refused_without_running_it(tmp_path, planted_in):
    root = tmp_path / "cifar"
    write_cifar(root)
    marker = tmp_path / "planted"
    record = {b"label_names": [b"x"] * 10, b"payload": PlantsAFolder(str(marker))}
    if planted_in != "batches.meta":
        record = pickle.loads((root / planted_in).read_bytes())
        record[b"payload"] = PlantsAFolder(str(marker))
    (root / planted_in).write_bytes(pickle.dumps(record))
    with pytest.raises(ValueError, match=f"{planted_in}.*refused to load posix.mkdir"):
        load_data(DataConfig(name="cifar10", root=str(root)))
    assert not marker.exists()
    # The unpickler still rebuilds what a real batch holds: numpy arrays, bytes, lists of numpy ints.
    from topkconv.data.cifar10 import load_pickle

    batch = {b"batch_label": b"training batch 1 of 5", b"data": np.arange(6, dtype=np.uint8).reshape(2, 3),
             b"labels": [np.int64(3), 4], b"filenames": [b"a.png", "b.png"]}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        (tmp_path / "ok").write_bytes(pickle.dumps(batch, protocol=protocol))
        loaded = load_pickle(tmp_path / "ok", "CIFAR-10 pickle")
        assert loaded[b"labels"] == [3, 4] and loaded[b"filenames"] == [b"a.png", "b.png"]
        np.testing.assert_array_equal(loaded[b"data"], batch[b"data"])


def test_a_loader_workers_error_arrives_as_its_own_message(tmp_path):
    write_tree(tmp_path / "pets", ["cat", "dog"], per_class=4, size=8)
    (tmp_path / "pets" / "dog" / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n torn")
    with pytest.raises(ValueError) as caught:  # the mean and std are measured on a sample read with workers
        load_data(DataConfig(name="imagefolder", root=str(tmp_path / "pets"), image_size=8, workers=2))
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "pets" / "dog" / "img1.png")) and "cannot read image" in message
    assert "\n" not in message and "Traceback" not in message


def test_workers_must_not_be_negative():
    with pytest.raises(ValueError, match="data.workers"):
        load_data(DataConfig(name="digits", workers=-1))


# ---------------------------------------------------------------- Fashion-MNIST IDX files

IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_bytes(array, magic):
    """An IDX file as its format defines it: big-endian magic, one big-endian uint32 per dim, the bytes."""
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_fashion(root, n_train=40, n_test=12, gz=True, seed=0):
    """Four small IDX files (every class in both splits); returns {split: (images, labels)}."""
    import gzip

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        for stem, array, magic in zip(IDX_STEMS[split], (images, labels), (2051, 2049)):
            data = idx_bytes(array, magic)
            if gz:
                (root / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (root / stem).write_bytes(data)
        written[split] = (images, labels)
    return written


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files_and_pads_28_to_32(tmp_path, gz):
    written = write_fashion(tmp_path / "fm", gz=gz)
    data = load_data(DataConfig(name="fashion-mnist", root=str(tmp_path / "fm")))
    assert (len(data.train), len(data.test), data.in_channels, data.num_classes) == (40, 12, 1, 10)
    assert data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"
    assert data.train.images.dtype == torch.uint8  # held as bytes, converted per batch
    x, y = data.test_tensors()
    images, labels = written["test"]
    assert x.shape == (12, 1, 32, 32) and y.tolist() == labels.tolist()
    torch.testing.assert_close(x[:, 0, 2:30, 2:30], torch.from_numpy(images).float() / 255)
    assert x[:, :, :2].abs().sum() == 0 and x[:, :, :, 30:].abs().sum() == 0  # a black (zero) border
    padded = np.pad(written["train"][0] / 255, ((0, 0), (2, 2), (2, 2)))
    assert data.mean == pytest.approx([padded.mean()], abs=1e-5)
    assert data.std == pytest.approx([padded.std()], abs=1e-5)
    native = load_data(DataConfig(name="fashion-mnist", root=str(tmp_path / "fm"), image_size=28))
    torch.testing.assert_close(native.test_tensors()[0][:, 0], torch.from_numpy(images).float() / 255)
    assert load_data(DataConfig(name="fashion-mnist", root=str(tmp_path / "fm"), image_size=16)).test_tensors(3)[0].shape == (3, 1, 16, 16)
    assert load_data(DataConfig(name="fashion-mnist", root=str(tmp_path / "fm"), image_size=64)).test_tensors(3)[0].shape == (3, 1, 64, 64)


def test_fashion_mnist_validation_split_is_fixed_stratified_and_disjoint(tmp_path):
    from topkconv.data.fashion_mnist import VALIDATION_SIZE
    from topkconv.data.splits import validation_split

    written = write_fashion(tmp_path / "fm", n_train=60, gz=False)
    data = load_data(DataConfig(name="fashion-mnist-val", root=str(tmp_path / "fm")))
    again = load_data(DataConfig(name="fashion-mnist-val", root=str(tmp_path / "fm")))
    other = load_data(DataConfig(name="fashion-mnist-val", root=str(tmp_path / "fm"), split_seed=1))
    assert (len(data.train), len(data.test)) == (30, 30)  # 60 images: at most half held out
    assert torch.equal(data.test.images, again.test.images) and torch.equal(data.train.images, again.train.images)
    assert not torch.equal(data.test.images, other.test.images)
    train_rows = {bytes(row) for row in data.train.images.numpy()}
    val_rows = {bytes(row) for row in data.test.images.numpy()}
    all_rows = {bytes(np.pad(row, ((2, 2), (2, 2)))) for row in written["train"][0]}
    assert not train_rows & val_rows and train_rows | val_rows == all_rows  # disjoint, and together all of train
    assert data.test.labels.bincount(minlength=10).tolist() == [3] * 10  # stratified
    assert "validation" in data.info["tested_on"]
    labels = torch.arange(60000) % 10
    train_idx, val_idx = validation_split(labels, VALIDATION_SIZE, 0)
    assert (len(train_idx), len(val_idx)) == (55000, 5000)
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    assert torch.equal(val_idx, validation_split(labels, VALIDATION_SIZE, 0)[1])
    with pytest.raises(ValueError, match="0 < size < 10"):
        validation_split(labels[:10], 10, 0)


def test_fashion_mnist_missing_files_name_them_and_both_sources(tmp_path):
    from topkconv.errors import one_line

    write_fashion(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_data(DataConfig(name="fashion-mnist", root=str(tmp_path / "fm")))
    text = one_line(err.value)
    assert text == str(err.value)  # already one line
    for part in ("t10k-labels-idx1-ubyte", str(tmp_path / "fm"), "apt-get install dataset-fashion-mnist",
                 "zalandoresearch/fashion-mnist", "--data-root DIR", "--data DIR"):
        assert part in text, part
    assert "train-images-idx3-ubyte" not in text  # only the missing file is named
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*t10k-labels-idx1-ubyte"):
        load_data(DataConfig(name="fashion-mnist-val", root=str(tmp_path / "empty")))


def test_fashion_mnist_defaults_to_debians_folder(tmp_path, monkeypatch):
    from topkconv.data import fashion_mnist

    monkeypatch.setattr(fashion_mnist, "DEBIAN_ROOT", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"nowhere \(the default folder, as no data.root"):
        load_data(DataConfig(name="fashion-mnist"))
    write_fashion(tmp_path / "nowhere")
    data = load_data(DataConfig(name="fashion-mnist"))
    assert (len(data.train), data.info["root"]) == (40, str(tmp_path / "nowhere"))


def _corrupt(path, data):
    import gzip

    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("stem, damage, message", [
    ("train-images-idx3-ubyte", lambda raw: (2049).to_bytes(4, "big") + raw[4:], "magic number 2049, expected 2051"),
    ("t10k-labels-idx1-ubyte", lambda raw: (2051).to_bytes(4, "big") + raw[4:], "magic number 2051, expected 2049"),
    ("train-images-idx3-ubyte", lambda raw: raw[:-5], "truncated IDX file.*31360 data bytes, found 31355"),
    ("train-labels-idx1-ubyte", lambda raw: raw[:6], "truncated IDX file: 6 bytes"),
    ("t10k-images-idx3-ubyte", lambda raw: raw + b"\0", "longer than its header says"),
    ("train-labels-idx1-ubyte", lambda raw: raw[:-1] + bytes([10]), r"labels must lie in 0..9, found 10"),
    ("t10k-labels-idx1-ubyte", lambda raw: idx_bytes(np.zeros(11, np.uint8), 2049), "11 labels but .* 12 images"),
    ("t10k-images-idx3-ubyte", lambda raw: idx_bytes(np.zeros((12, 32, 32), np.uint8), 2051), "expected 28x28"),
])
def test_fashion_mnist_bad_files_are_one_line_errors_naming_the_file(tmp_path, gz, stem, damage, message):
    import gzip

    write_fashion(tmp_path / "fm", gz=gz)
    path = tmp_path / "fm" / (f"{stem}.gz" if gz else stem)
    raw = path.read_bytes()
    _corrupt(path, damage(gzip.decompress(raw) if gz else raw))
    with pytest.raises(ValueError, match=message) as err:
        load_data(DataConfig(name="fashion-mnist", root=str(tmp_path / "fm")))
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_fashion_mnist_cut_gzip_stream_names_the_file(tmp_path):
    write_fashion(tmp_path / "fm")
    path = tmp_path / "fm" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{path}: truncated or corrupt gzip file"):
        load_data(DataConfig(name="fashion-mnist", root=str(tmp_path / "fm")))


def test_cli_dataset_choices_are_the_registry():
    from topkconv.cli import build_parser
    from topkconv.data import LOADERS

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    dataset = next(a for a in train._actions if a.dest == "dataset")
    assert sorted(dataset.choices) == sorted(LOADERS)


# ---------------------------------------------------------------- the fashion and cifar10 table specs

EXPERIMENTS = Path(__file__).resolve().parents[1] / "src" / "topkconv" / "experiments"


def _build_every_column(table, root):
    """Each reproduced column's model, built on the data at ``root``, maps 2 test images to 10 logits."""
    from topkconv.models import build_model
    from topkconv.train import resolve_spec

    for label in table.reproduced_labels:
        spec = table.run_spec(label, {"data": {"root": str(root)}})
        data = load_data(spec.data)
        model = build_model(resolve_spec(spec, data).model).eval()
        with torch.no_grad():
            assert model(data.test_tensors(2)[0]).shape == (2, 10), label


def test_cifar10_table3_spec_builds_full_width_models_on_cifar_files(tmp_path):
    from topkconv.reproduce import load_table_spec

    write_cifar(tmp_path / "cifar")
    table = load_table_spec(EXPERIMENTS / "table3-cifar10.toml")
    base = table.run_spec("Baseline")
    assert (table.preset, base.data.name, base.data.image_size, base.model.arch, base.model.width) == \
        ("cifar10", "cifar10", 32, "vgg-small", 1.0)
    pgd = base.attack.budget("pgd")
    assert (base.attack.eps, pgd.steps, pgd.step_size) == (8.0, 16, 0.75)
    _build_every_column(table, tmp_path / "cifar")


@pytest.mark.parametrize("name", ["table1", "table2", "table3", "tableat"])
def test_fashion_specs_load_plan_and_build_on_idx_files(tmp_path, name):
    from topkconv.reproduce import Study, Workspace, load_table_spec
    from topkconv.reproduce.tables import meta

    write_fashion(tmp_path / "fm")
    table = load_table_spec(EXPERIMENTS / f"{name}-fashion.toml")
    base = table.run_spec(table.reproduced_labels[0])
    assert (table.preset, base.data.name, base.data.image_size, base.attack.eps) == ("fashion", "fashion-mnist", 32, 8.0)
    assert table.seeds >= 10 and base.attack.suite == "full"
    # the strong suite on at least 500 images, or a cut that the report's note declares
    assert base.attack.n_examples >= 500 or f"first {base.attack.n_examples} (CUT from the 500" in table.note
    assert base.attack.indicators.examples >= 100   # a verdict preset's masking indicators (issue 22)
    study = Study(table)
    described = meta(study)  # what the report says: not "embedded", and no absolute path
    assert "(its default location)" in described["data"] and "(spec /" not in described["preset"]
    jobs, cached = Workspace(tmp_path / "out").plan([study])
    runs = [j for j in jobs if j.step in ("train", "prune", "derive")]  # one made run per column and seed
    assert not cached and len(runs) == table.seeds * len(table.reproduced_labels)
    evaluations = len(study.attack_configs(base, table.reproduced_labels[0]))
    assert len(jobs) - len(runs) == table.seeds * len(table.reproduced_labels) * evaluations
    _build_every_column(table, tmp_path / "fm")


def test_reproduce_preset_choices_are_the_spec_presets():
    from topkconv.cli import build_parser
    from topkconv.reproduce import PRESETS

    commands = build_parser()._subparsers._group_actions[0].choices
    for command in ("reproduce", "sweep"):
        preset = next(a for a in commands[command]._actions if a.dest == "preset")
        assert tuple(preset.choices) == PRESETS, command


def test_the_built_in_claims_name_real_columns_of_the_fashion_tables():
    from topkconv.reproduce import claims as C
    from topkconv.reproduce import load_table_spec

    tables = {t: load_table_spec(EXPERIMENTS / f"{t}-fashion.toml") for t in ("table1", "table2", "table3")}
    claims = C.load_claims(EXPERIMENTS / "claims.toml", tables)  # an unknown column would be an error
    assert {c.table for c in claims if c.source == "paper"} == set(tables)
    assert C.load_claims(EXPERIMENTS / "claims.toml", {"table3": load_table_spec(EXPERIMENTS / "table3-cifar10.toml")})
