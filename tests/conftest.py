"""Shared fixtures: the real CIFAR-10 archive, and small data sets the tests write themselves."""

from __future__ import annotations

import json
import os
import pickle
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def cifar_jpeg_dir(tmp_path_factory) -> Path:
    """The real CIFAR-10 (JPEG) as an image folder: train/<class>/*.jpg and test/<class>/*.jpg.

    Read from $CIFAR10_JPEG_ARCHIVE or ../shared/data/cifar10-jpeg.tar.gz. CI always has it;
    elsewhere the real-data tests are skipped when it is absent.
    """
    archive = Path(os.environ.get("CIFAR10_JPEG_ARCHIVE", DEFAULT_ARCHIVE))
    if not archive.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"real CIFAR-10 archive missing at {archive}")
        pytest.skip(f"real CIFAR-10 archive not found at {archive} (set CIFAR10_JPEG_ARCHIVE)")
    target = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target / "cifar10-jpeg"


@pytest.fixture(scope="session")
def smoke_search(cifar_jpeg_dir, tmp_path_factory) -> SimpleNamespace:
    """One real search on CIFAR-10 (smoke space, 8 trials x up to 3 epochs, 1,024 training images),
    tracked in a SQLite store of its own, shared by the tests that read its results."""
    import ray

    from tuning.search import SUMMARY_FILE, main

    folder = tmp_path_factory.mktemp("smoke_search")
    uri = f"sqlite:///{folder}/mlflow.db"
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, configure_logging=False)
    try:
        argv = ["--space", "smoke", "--num-samples", "8", "--max-epochs", "3", "--num-gpus", "0",
                "--dataset", "folder", "--data", str(cifar_jpeg_dir), "--train-limit", "1024", "--val-size", "500",
                "--storage-path", str(folder / "ray"), "--name", "smoke", "--tracking-uri", uri,
                "--experiment", "e2e", "--registered-model", "allconv-test"]  # fmt: skip
        assert main(argv) == 0
    finally:
        ray.shutdown()
    experiment = folder / "ray" / "smoke"
    return SimpleNamespace(uri=uri, experiment=experiment, summary=json.loads((experiment / SUMMARY_FILE).read_text()))


def write_image_folder(root: Path, classes=("cat", "dog", "frog"), per_class=(12, 4), size=16, seed=0) -> Path:
    """train/<class>/*.png and test/<class>/*.png. Each class has its own mean colour, so a
    net can learn it in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    for split, count in zip(("train", "test"), per_class):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                noise = torch.randint(0, 60, (3, size, size), generator=generator)
                image = (noise + 60 * label + 40).clamp(0, 255).to(torch.uint8)
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "images")


def write_cifar10_batches(root: Path, per_batch: int = 20, seed: int = 0) -> Path:
    """Small files in the real cifar-10-batches-py pickle format (dicts of 'data' and 'labels')."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = [i % 10 for i in range(per_batch)]
        batch = {"batch_label": name, "labels": labels, "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f)
    return root
