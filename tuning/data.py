"""Images in, device-resident uint8 tensors out.

Sources are decoded once into uint8 tensors and cached beside the data. A trial moves its
splits to its device once; every training batch is then cropped, flipped and converted there,
with no per-image PIL work and no DataLoader workers in the hot loop.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)

DATASETS = ("cifar10", "folder")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
CACHE_DIR = ".allconv-cache"
CACHE_FORMAT = 1  # bump when the cached layout changes
CROP_PADDING = 4  # the standard CIFAR augmentation: pad 4, random 32x32 crop


class DataError(ValueError):
    """A data source that cannot be used; the message names the path."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8, (N, C, H, W)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def subset(self, indices: torch.Tensor) -> Split:
        return Split(self.images[indices], self.labels[indices])


@dataclass(frozen=True)
class ImageData:
    """A decoded data set: the source's own train and test splits."""

    train: Split
    test: Split
    classes: tuple[str, ...]


@dataclass(frozen=True)
class TrialData:
    """What every trial trains on: train, a held-out validation split, test, and the
    training split's per-channel mean and std (in [0, 1] units)."""

    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]


# ---------------------------------------------------------------- loading and caching


def load_data(dataset: str, root: str | os.PathLike, image_size: int | None = None) -> ImageData:
    """Decode `root` once, then read the cache beside it on every later call."""
    root = Path(root)
    if dataset == "cifar10":
        batches = ensure_cifar10(root)
        files, decode = sorted(batches.iterdir()), lambda: read_cifar10_batches(batches)
    elif dataset == "folder":
        files, decode = folder_files(root), lambda: read_image_folder(root, image_size)
    else:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    fingerprint = fingerprint_files(root, files, extra=f"{dataset}:{image_size}:{CACHE_FORMAT}")
    cache = root / CACHE_DIR / f"{dataset}-{fingerprint[:16]}.pt"
    data = read_cache(cache, fingerprint)
    if data is None:
        data = decode()
        write_cache(cache, fingerprint, data)
    return data


def fingerprint_files(root: Path, files: list[Path], extra: str) -> str:
    digest = hashlib.sha256(extra.encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def read_cache(cache: Path, fingerprint: str) -> ImageData | None:
    if not cache.exists():
        return None
    try:
        saved = torch.load(cache, weights_only=True)
        if saved["fingerprint"] != fingerprint:
            raise ValueError("it was made from other files")
        data = ImageData(
            train=Split(saved["train_images"], saved["train_labels"]),
            test=Split(saved["test_images"], saved["test_labels"]),
            classes=tuple(saved["classes"]),
        )
        check_consistent(data, cache)
    except Exception as err:  # any unreadable cache is rebuilt, never trusted
        log.warning("cache %s is unusable (%s); decoding the data again", cache, err)
        return None
    log.info("read %d images from cache %s", len(data.train) + len(data.test), cache)
    return data


def write_cache(cache: Path, fingerprint: str, data: ImageData) -> None:
    payload = {
        "fingerprint": fingerprint,
        "train_images": data.train.images,
        "train_labels": data.train.labels,
        "test_images": data.test.images,
        "test_labels": data.test.labels,
        "classes": list(data.classes),
    }
    try:
        cache.parent.mkdir(exist_ok=True)
        for stale in cache.parent.glob(f"{cache.name.split('-')[0]}-*.pt"):
            stale.unlink()
        atomic_save(payload, cache)
    except OSError as err:  # a read-only data dir still trains, it just decodes every time
        log.warning("could not write cache %s (%s); the next load decodes again", cache, err)


def atomic_save(payload: object, path: Path) -> None:
    """torch.save to a temp file beside `path`, then rename: a reader never sees half a file."""
    atomic_write(path, lambda f: torch.save(payload, f))


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_consistent(data: ImageData, source: Path) -> None:
    for name, split in (("train", data.train), ("test", data.test)):
        images, labels = split.images, split.labels
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise DataError(f"{source}: {name} images must be uint8 (N, C, H, W) with one label each")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(data.classes)):
            raise DataError(f"{source}: {name} labels fall outside the {len(data.classes)} classes")


# ---------------------------------------------------------------- CIFAR-10 (cifar-10-batches-py)

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


def ensure_cifar10(root: Path) -> Path:
    batches = root / CIFAR10_FOLDER
    if not batches.is_dir():
        from torchvision.datasets import CIFAR10

        log.info("downloading CIFAR-10 into %s", root)
        try:
            CIFAR10(root, train=True, download=True)
        except Exception as err:
            raise DataError(
                f"{batches} is missing and CIFAR-10 could not be downloaded into {root} ({err}); "
                "put cifar-10-batches-py there, or pass --dataset folder --data DIR"
            ) from err
    return batches


def read_cifar10_batches(batches: Path) -> ImageData:
    """Reads the python-pickle release: each batch holds 'data' (N, 3072) and 'labels'."""

    def read(path: Path) -> dict:
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")
        except (OSError, pickle.UnpicklingError, EOFError) as err:
            raise DataError(f"{path}: cannot read this CIFAR-10 batch ({err})") from err

    def split(names: tuple[str, ...]) -> Split:
        parts = [read(batches / name) for name in names]
        images = torch.cat([torch.as_tensor(p["data"], dtype=torch.uint8).view(-1, 3, 32, 32) for p in parts])
        labels = torch.cat([torch.as_tensor(p["labels"], dtype=torch.int64) for p in parts])
        return Split(images, labels)

    classes = tuple(read(batches / "batches.meta")["label_names"])
    data = ImageData(train=split(CIFAR10_TRAIN_BATCHES), test=split(("test_batch",)), classes=classes)
    check_consistent(data, batches)
    log.info("decoded %d CIFAR-10 images from %s", len(data.train) + len(data.test), batches)
    return data


# ---------------------------------------------------------------- image folders (train/<class>/*)


def folder_classes(root: Path) -> dict[str, list[str]]:
    if not root.is_dir():
        raise DataError(f"{root}: data dir does not exist")
    classes = {}
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"{split_dir}: missing; an image folder needs train/<class>/ and test/<class>/")
        classes[split] = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes[split]:
            raise DataError(f"{split_dir}: no class folders in it")
    if classes["train"] != classes["test"]:
        only_train = sorted(set(classes["train"]) - set(classes["test"]))
        only_test = sorted(set(classes["test"]) - set(classes["train"]))
        raise DataError(
            f"{root}: class folders differ between train and test "
            f"(only in train: {only_train or 'none'}; only in test: {only_test or 'none'})"
        )
    return classes


def class_images(class_dir: Path) -> list[Path]:
    images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{class_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it")
    return images


def folder_files(root: Path) -> list[Path]:
    classes = folder_classes(root)["train"]
    return [path for split in ("train", "test") for name in classes for path in class_images(root / split / name)]


def decode_rgb(path: Path, image_size: int | None) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image_size is not None and image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=None)
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            return pixels.view(image.height, image.width, 3).permute(2, 0, 1)
    except Exception as err:
        raise DataError(f"{path}: unreadable image ({err})") from err


def read_image_folder(root: Path, image_size: int | None) -> ImageData:
    classes = folder_classes(root)["train"]
    splits = {}
    # Threads, not processes: Pillow's decoders release the GIL.
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        for split in ("train", "test"):
            paths, labels = [], []
            for label, name in enumerate(classes):
                found = class_images(root / split / name)
                paths += found
                labels += [label] * len(found)
            images = list(pool.map(lambda p: decode_rgb(p, image_size), paths))
            sizes = {tuple(im.shape[-2:]) for im in images}
            if len(sizes) > 1:
                odd = next(p for p, im in zip(paths, images) if im.shape[-2:] != images[0].shape[-2:])
                raise DataError(
                    f"{odd}: images differ in size ({sorted(sizes)[:3]}...); pass --resize N to resize them"
                )
            splits[split] = Split(torch.stack(images), torch.tensor(labels, dtype=torch.int64))
    data = ImageData(train=splits["train"], test=splits["test"], classes=tuple(classes))
    if data.train.images.shape[1:] != data.test.images.shape[1:]:
        raise DataError(f"{root}: train and test images differ in size; pass --resize N to resize them")
    log.info("decoded %d images from %s", len(data.train) + len(data.test), root)
    return data


# ---------------------------------------------------------------- splits


def stratified_split(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, val) indices; each class keeps its share of the validation split."""
    n = len(labels)
    if not 1 <= val_size < n:
        raise DataError(f"val_size={val_size} must be at least 1 and less than the {n} training images")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    order = order[torch.sort(labels[order], stable=True).indices]  # grouped by class, random within
    counts = torch.bincount(labels)
    exact = counts.double() * val_size / n
    take = exact.floor().long()
    leftover = val_size - int(take.sum())
    take[torch.argsort(exact - take, descending=True)[:leftover]] += 1
    starts = torch.cumsum(counts, 0) - counts
    in_val = torch.zeros(n, dtype=torch.bool)
    for start, k in zip(starts.tolist(), take.tolist()):
        in_val[order[start : start + k]] = True
    return torch.nonzero(~in_val).flatten(), torch.nonzero(in_val).flatten()


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, in float64 chunks to bound memory."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for part in images.split(chunk):
        x = part.double().div_(255)
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def make_trial_data(data: ImageData, val_size: int = 5000, seed: int = 0, train_limit: int | None = None) -> TrialData:
    """Holds out a stratified validation split; `train_limit` keeps a seeded subset of the rest."""
    train_idx, val_idx = stratified_split(data.train.labels, val_size, seed)
    if train_limit is not None:
        if train_limit < 1:
            raise DataError(f"train_limit={train_limit} must be at least 1")
        keep = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed + 1))[:train_limit]
        train_idx = train_idx[keep.sort().values]
    train = data.train.subset(train_idx)
    mean, std = channel_stats(train.images)
    return TrialData(train, data.train.subset(val_idx), data.test, data.classes, mean, std)


# ---------------------------------------------------------------- batches on the device


def to_model_input(images: torch.Tensor, image_size: int | None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [0, 1] at `image_size`, channels_last."""
    x = images.float().div_(255)
    if image_size is not None and x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    # NHWC: what tensor cores want, and about 25% faster than NCHW for these convs on CPU too.
    return x.contiguous(memory_format=torch.channels_last)


def crop_and_flip(images: torch.Tensor, generator: torch.Generator, padding: int = CROP_PADDING) -> torch.Tensor:
    """Random crop (zero padding) and horizontal flip of a uint8 batch, in one gather."""
    b, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator, device=device)
    flip = torch.rand(b, 1, generator=generator, device=device) < 0.5
    rows = dy + torch.arange(h, device=device)
    cols = dx + torch.arange(w, device=device)
    cols = torch.where(flip, cols.flip(1), cols)  # a flip is the crop's columns read backwards
    batch = torch.arange(b, device=device).view(b, 1, 1, 1)
    channel = torch.arange(c, device=device).view(1, c, 1, 1)
    return padded[batch, channel, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def train_batches(
    split: Split, batch_size: int, generator: torch.Generator, augment: bool, image_size: int | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled epoch. The last partial batch is dropped so every step has the same shape."""
    n = len(split)
    batch_size = min(batch_size, n)
    order = torch.randperm(n, generator=generator, device=generator.device)
    for start in range(0, n - batch_size + 1, batch_size):
        idx = order[start : start + batch_size]
        images = split.images[idx]
        if augment:
            images = crop_and_flip(images, generator)
        yield to_model_input(images, image_size), split.labels[idx]


def eval_batches(split: Split, batch_size: int, image_size: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(split), batch_size):
        yield to_model_input(split.images[start : start + batch_size], image_size), split.labels[start : start + batch_size]


# ---------------------------------------------------------------- command line


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset", choices=DATASETS, default="cifar10",
        help="cifar10: the cifar-10-batches-py release (downloaded into --data if missing); "
        "folder: your own images as DATA/train/<class>/* and DATA/test/<class>/*",
    )  # fmt: skip
    group.add_argument("--data", default="data", help="data dir (default: ./data)")
    group.add_argument("--resize", type=int, default=None, metavar="N", help="folder only: resize every image to N x N when decoding")
    group.add_argument("--val-size", type=int, default=5000, help="training images held out to select on (default: 5000)")
    group.add_argument("--train-limit", type=int, default=None, help="train on a seeded subset of N images (quick runs)")
    group.add_argument("--data-seed", type=int, default=0, help="seed of the validation split, shared by every trial")


def trial_data_from_args(args: argparse.Namespace) -> TrialData:
    data = load_data(args.dataset, args.data, args.resize)
    return make_trial_data(data, args.val_size, args.data_seed, args.train_limit)
