import logging
import os

import pytest
import torch

from tuning.data import (
    DataError,
    Split,
    crop_and_flip,
    load_data,
    make_trial_data,
    stratified_split,
    to_model_input,
    train_batches,
)
from tests.conftest import write_cifar10_batches, write_image_folder


def test_reads_the_cifar10_pickle_format(tmp_path):
    root = write_cifar10_batches(tmp_path, per_batch=20)
    data = load_data("cifar10", root)
    assert data.train.images.shape == (100, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (20, 3, 32, 32)
    assert data.classes[0] == "airplane" and len(data.classes) == 10
    assert data.train.labels.tolist()[:3] == [0, 1, 2]


def test_reads_an_image_folder(image_folder):
    data = load_data("folder", image_folder)
    assert data.classes == ("cat", "dog", "frog")
    assert data.train.images.shape == (36, 3, 16, 16) and data.test.images.shape == (12, 3, 16, 16)
    assert data.train.labels.bincount().tolist() == [12, 12, 12]


def test_resize_brings_mixed_sizes_to_one(tmp_path):
    root = write_image_folder(tmp_path / "a", size=16)
    write_image_folder(tmp_path / "b", size=20)
    (tmp_path / "b" / "train" / "cat" / "0000.png").rename(root / "train" / "cat" / "big.png")
    with pytest.raises(DataError, match="--resize"):
        load_data("folder", root)
    assert load_data("folder", root, image_size=24).train.images.shape[-2:] == (24, 24)


@pytest.mark.parametrize("dataset, write", [("folder", write_image_folder), ("cifar10", write_cifar10_batches)])
def test_second_load_reads_the_cache_instead_of_decoding(tmp_path, caplog, dataset, write):
    root = write(tmp_path / "data")
    caplog.set_level(logging.INFO, logger="tuning.data")
    first = load_data(dataset, root)
    assert any(r.message.startswith("decoded") for r in caplog.records)
    caplog.clear()
    second = load_data(dataset, root)
    assert not any(r.message.startswith("decoded") for r in caplog.records)
    assert any(r.message.startswith("read") and "cache" in r.message for r in caplog.records)
    assert torch.equal(first.train.images, second.train.images) and first.classes == second.classes


def test_corrupt_cache_is_rebuilt_with_a_warning(image_folder, caplog):
    first = load_data("folder", image_folder)
    (cache,) = (image_folder / ".allconv-cache").glob("*.pt")
    cache.write_bytes(cache.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="tuning.data"):
        again = load_data("folder", image_folder)
    assert any(str(cache) in r.message and r.levelno == logging.WARNING for r in caplog.records)
    assert torch.equal(first.train.images, again.train.images)
    assert torch.load(cache, weights_only=True)["train_images"].shape == first.train.images.shape


def test_changed_files_invalidate_the_cache(image_folder):
    load_data("folder", image_folder)
    extra = image_folder / "train" / "cat" / "0000.png"
    extra.with_name("9999.png").write_bytes(extra.read_bytes())
    assert len(load_data("folder", image_folder).train) == 37


def test_missing_dir_is_named(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        load_data("folder", tmp_path / "nope")


def test_empty_dir_is_named(tmp_path):
    with pytest.raises(DataError, match="train"):
        load_data("folder", tmp_path)


def test_empty_class_folder_is_named(image_folder):
    for f in (image_folder / "test" / "dog").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="dog"):
        load_data("folder", image_folder)


def test_unreadable_image_is_named(image_folder):
    bad = image_folder / "train" / "dog" / "0003.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="0003.png"):
        load_data("folder", image_folder)


def test_class_folders_that_differ_are_named(image_folder):
    (image_folder / "test" / "frog").rename(image_folder / "test" / "toad")
    with pytest.raises(DataError, match="toad"):
        load_data("folder", image_folder)


def test_missing_cifar10_without_network_names_the_path(tmp_path):
    os.environ.setdefault("no_proxy", "*")
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_data("cifar10", tmp_path)


def test_corrupt_cifar10_batch_is_named(tmp_path):
    root = write_cifar10_batches(tmp_path)
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="data_batch_3"):
        load_data("cifar10", root)


def test_validation_split_is_stratified_seeded_and_disjoint():
    labels = torch.arange(10).repeat_interleave(torch.tensor([100, 200, 300, 400, 500, 100, 200, 300, 400, 500]))
    train, val = stratified_split(labels, 300, seed=3)
    assert len(val) == 300 and len(train) == len(labels) - 300
    assert not set(train.tolist()) & set(val.tolist())
    assert labels[val].bincount().tolist() == [10, 20, 30, 40, 50, 10, 20, 30, 40, 50]
    assert torch.equal(val, stratified_split(labels, 300, seed=3)[1])
    assert not torch.equal(val, stratified_split(labels, 300, seed=4)[1])


def test_val_size_must_leave_training_images():
    with pytest.raises(DataError, match="val_size"):
        stratified_split(torch.zeros(10, dtype=torch.long), 10, seed=0)


def test_trial_data_normalises_with_the_training_split_only(image_folder):
    data = load_data("folder", image_folder)
    trial = make_trial_data(data, val_size=6, seed=0)
    assert len(trial.train) == 30 and len(trial.val) == 6
    expected = trial.train.images.double().div(255).mean(dim=(0, 2, 3))
    assert torch.allclose(torch.tensor(trial.mean, dtype=torch.float64), expected)
    limited = make_trial_data(data, val_size=6, seed=0, train_limit=10)
    assert len(limited.train) == 10 and torch.equal(limited.val.labels, trial.val.labels)


def test_crop_and_flip_moves_pixels_without_changing_them():
    images = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = crop_and_flip(images, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for original, augmented in zip(images, out):
        candidates = []
        padded = torch.nn.functional.pad(original, (2, 2, 2, 2))
        for dy in range(5):
            for dx in range(5):
                crop = padded[:, dy : dy + 8, dx : dx + 8]
                candidates += [crop, crop.flip(-1)]
        assert any(torch.equal(augmented, c) for c in candidates)
    flipped = sum(torch.equal(o, i.flip(-1)) for o, i in zip(crop_and_flip(images, torch.Generator(), 0), images))
    assert 16 < flipped < 48


def test_train_batches_cover_an_epoch_once_and_drop_the_last_partial_batch():
    split = Split(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 4, 4).contiguous(), torch.arange(10))
    batches = list(train_batches(split, 4, torch.Generator().manual_seed(0), augment=False, image_size=None))
    assert [len(y) for _, y in batches] == [4, 4]
    seen = torch.cat([y for _, y in batches])
    assert len(set(seen.tolist())) == 8
    x, y = batches[0]
    assert torch.allclose(x[:, 0, 0, 0] * 255, y.float())


def test_model_input_is_float_in_unit_range_at_the_training_size():
    x = to_model_input(torch.full((2, 3, 32, 32), 255, dtype=torch.uint8), image_size=64)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32 and torch.allclose(x, torch.ones(()))
