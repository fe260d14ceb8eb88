"""Data: the embedded Fashion-MNIST default, CIFAR-10/100 python folders, ImageFolder trees.

Everything is held in memory as uint8 NCHW arrays and batched with vectorised augmentation
(random crop with 4-pixel padding, horizontal flip), which on a 2-core machine is far cheaper than
a per-image DataLoader. Fashion-MNIST's 1x28x28 images are padded to 32x32 and repeated to three
channels, so CIFAR-style models and corruption suites apply unchanged.

Resolution of ``--data``:
  1. an existing path: a folder holding Fashion-MNIST's four ``*-ubyte.gz`` files, a CIFAR-10/100
     python-format folder (``data_batch_1`` / ``train``), or an ImageFolder tree (``train/`` and
     ``test/`` (or ``val/``) sub-folders of class folders);
  2. the name ``fashion-mnist``: ``$LATPRUNE_DATA/fashion-mnist``, then the Debian package's
     ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``), then a
     torchvision download into the cache (only where the internet is reachable).
"""
from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import pickle
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from latprune.errors import BadInput

__all__ = ["FASHION_CLASSES", "DEBIAN_FMNIST", "DataConfig", "Split", "Dataset", "load_dataset"]

log = logging.getLogger(__name__)

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot"]
_FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str = "fashion-mnist"  # a dataset name or a path
    val_size: int = 5000  # held out of the training set
    train_subset: int = 0  # 0: the whole (remaining) training set
    test_subset: int = 0  # 0: the whole test set
    image_size: int = 32  # ImageFolder images are resized to this
    # which training images are held out for validation: fixed, not the run's --seed, so every seed
    # (and the bundled dense model, trained on this split) sees the same validation images
    split_seed: int = 0
    # `latprune profile` without data: the model's input is 3 x input_size x input_size and it has
    # num_classes outputs (0: 1000, ImageNet's); 0 reads both from the data
    input_size: int = 0
    num_classes: int = 0

    def __post_init__(self):
        for f in ("val_size", "train_subset", "test_subset", "input_size", "num_classes"):
            if getattr(self, f) < 0:
                raise ValueError(f"data.{f} must be >= 0, got {getattr(self, f)}")
        if self.num_classes and not self.input_size:
            raise ValueError("data.num_classes (--num-classes) goes with --input-size (profiling without data); "
                             "with data, the classes are the data's")


@dataclasses.dataclass
class Split:
    x: np.ndarray  # uint8 [N, C, H, W]
    y: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.y)


@dataclasses.dataclass
class Dataset:
    name: str
    source: str
    train: Split
    val: Split
    test: Split
    classes: list[str]
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    resize: str = "none"  # how raw images become the model's input size

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def preprocessing(self) -> dict:
        """The contract a deployer needs: what goes into the model."""
        c, h, w = self.input_shape
        return {"input_shape": [c, h, w], "channel_order": "RGB" if c == 3 else "gray", "scale": "1/255",
                "mean": list(self.mean), "std": list(self.std), "classes": self.classes, "resize": self.resize,
                "layout": "NCHW float32: (pixel / 255 - mean) / std"}

    def normalize(self, xb: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(xb).float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std

    def batches(self, split: Split, batch_size: int, shuffle: bool = False, augment: bool = False,
                rng: np.random.Generator | None = None, limit: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(split) if not limit else min(limit, len(split))
        order = rng.permutation(len(split))[:n] if shuffle else np.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            xb = split.x[idx]
            if augment:
                xb = _augment(xb, rng or np.random.default_rng())
            yield self.normalize(xb), torch.from_numpy(split.y[idx])


def _augment(xb: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    n, _, h, w = xb.shape
    padded = np.pad(xb, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, n))
    rows = dy[:, None] + np.arange(h)[None, :]
    cols = dx[:, None] + np.arange(w)[None, :]
    out = padded[np.arange(n)[:, None, None, None], np.arange(xb.shape[1])[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    flip = rng.random(n) < 0.5
    out[flip] = out[flip][..., ::-1]
    return np.ascontiguousarray(out)


def load_dataset(cfg: DataConfig, cache_dir: Path | None = None) -> Dataset:
    path = Path(cfg.name).expanduser()
    if path.exists():
        train, test, classes, name = _load_path(path, cfg)
    elif cfg.name in ("fashion-mnist", "fashion_mnist", "fmnist"):
        src = _find_fashion_mnist(cache_dir)
        train, test, classes, name, path = (*_load_fashion(src), "fashion-mnist", src)
    else:
        raise BadInput(
            f"data {cfg.name!r} is neither an existing path nor a known dataset: pass "
            "--data fashion-mnist or a folder (ImageFolder tree or CIFAR python folder)"
        )
    if len(train) == 0 or len(test) == 0:
        raise BadInput(f"data {path} has no training or no test images: check the folder layout")
    rng = np.random.default_rng(cfg.split_seed)
    perm = rng.permutation(len(train))
    n_val = min(cfg.val_size, len(train) // 5)
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    if cfg.train_subset:
        tr_idx = tr_idx[: cfg.train_subset]
    val = Split(train.x[val_idx], train.y[val_idx])
    train = Split(train.x[tr_idx], train.y[tr_idx])
    if cfg.test_subset:
        test = Split(test.x[: cfg.test_subset], test.y[: cfg.test_subset])
    xf = train.x.astype(np.float32) / 255.0
    mean = tuple(float(v) for v in xf.mean(axis=(0, 2, 3)))
    std = tuple(float(v) for v in xf.std(axis=(0, 2, 3)) + 1e-6)
    log.info("data %s: %d train, %d val, %d test, %s", name, len(train), len(val), len(test), train.x.shape[1:])
    resize = {"fashion-mnist": "pad 28x28 with zeros to 32x32, repeat gray to 3 channels",
              "cifar10": "none (32x32 RGB)", "cifar100": "none (32x32 RGB)"}.get(
        name, f"RGB, bilinear resize to {cfg.image_size}x{cfg.image_size}")
    return Dataset(name, str(path), train, val, test, classes, mean, std, resize)


def _find_fashion_mnist(cache_dir: Path | None) -> Path:
    candidates = []
    if os.environ.get("LATPRUNE_DATA"):
        candidates.append(Path(os.environ["LATPRUNE_DATA"]) / "fashion-mnist")
    candidates.append(DEBIAN_FMNIST)
    for c in candidates:
        if all((c / f).exists() for f in _FMNIST_FILES):
            return c
    if cache_dir is not None:
        dl = cache_dir / "fashion-mnist"
        if all((dl / f).exists() for f in _FMNIST_FILES):
            return dl
        try:  # only where the internet is reachable; never on the build machines
            import torchvision

            torchvision.datasets.FashionMNIST(str(dl / "tv"), train=True, download=True)
            torchvision.datasets.FashionMNIST(str(dl / "tv"), train=False, download=True)
            raw = dl / "tv" / "FashionMNIST" / "raw"
            dl.mkdir(parents=True, exist_ok=True)
            for f in _FMNIST_FILES:
                os.replace(raw / f, dl / f)
            return dl
        except Exception:
            pass
    raise BadInput(
        "Fashion-MNIST not found in $LATPRUNE_DATA/fashion-mnist or /usr/share/datasets/fashion-mnist: "
        "install it with `apt-get install dataset-fashion-mnist` (or run `make demo`)"
    )


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip): magic 0x0000 08 NDIM (unsigned bytes), NDIM big-endian sizes, the values."""
    fix = "reinstall the dataset (apt-get install --reinstall dataset-fashion-mnist) or replace the file"
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # not gzip, truncated, unreadable
        raise BadInput(f"{path} is not a readable gzip file ({e}): {fix}") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or len(data) < 4 + 4 * data[3]:
        raise BadInput(f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex() or 'missing'}): {fix}")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise BadInput(f"{path} is truncated ({arr.size} of {int(np.prod(dims))} values): {fix}")
    return arr.reshape(dims)


def _load_fashion(folder: Path) -> tuple[Split, Split, list[str]]:
    def split(prefix):
        x = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
        y = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        _check_split(folder / f"{prefix}-images-idx3-ubyte.gz", x, y, (28, 28), len(FASHION_CLASSES))
        x = np.pad(x, ((0, 0), (2, 2), (2, 2)))[:, None]  # 28x28 -> 32x32
        return Split(np.ascontiguousarray(np.repeat(x, 3, axis=1)), y)

    return split("train"), split("t10k"), list(FASHION_CLASSES)


def _load_path(path: Path, cfg: DataConfig):
    if not path.is_dir():
        raise BadInput(f"data path {path} is not a folder: pass a dataset folder")
    if all((path / f).exists() for f in _FMNIST_FILES):
        return (*_load_fashion(path), "fashion-mnist")
    if (path / "data_batch_1").exists() or (path / "train").is_file():
        return _load_cifar(path)
    return _load_imagefolder(path, cfg.image_size)


def _check_split(path: Path, x: np.ndarray, y: np.ndarray, shape: tuple[int, ...], num_classes: int) -> None:
    """Images of the expected shape, one label per image, labels in [0, num_classes)."""
    fix = "re-download or replace it"
    if tuple(x.shape[1:]) != shape:
        raise BadInput(f"{path}: images of shape {tuple(x.shape[1:])}, expected {shape}: {fix}")
    if len(y) != len(x) or y.ndim != 1:
        raise BadInput(f"{path}: {len(x)} images but {len(y)} labels: {fix}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise BadInput(f"{path}: labels span [{y.min()}, {y.max()}], expected [0, {num_classes - 1}]: {fix}")


def _load_cifar(path: Path):
    def unpickle(f):
        try:
            with open(f, "rb") as fh:
                return pickle.load(fh, encoding="latin1")
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
                IndexError, KeyError, OSError) as e:  # what a damaged or foreign pickle raises while loading
            raise BadInput(f"{f} is not a readable CIFAR python batch ({type(e).__name__}: {str(e)[:80]}): "
                           "re-download the dataset or replace the file") from None

    def field(d, f, key):
        if not isinstance(d, dict) or key not in d:
            raise BadInput(f"{f} holds no {key!r} entry: not a CIFAR python batch; re-download the dataset")
        return d[key]

    cifar10 = (path / "data_batch_1").exists()
    if cifar10:
        names = [f"data_batch_{i}" for i in range(1, 6) if (path / f"data_batch_{i}").exists()]
        test_name, key, meta, meta_key, name, k = "test_batch", "labels", "batches.meta", "label_names", "cifar10", 10
    else:
        names, test_name, key, meta, meta_key, name, k = ["train"], "test", "fine_labels", "meta", \
            "fine_label_names", "cifar100", 100
    if not (path / test_name).is_file():
        raise BadInput(f"{path} has no {test_name} file: a CIFAR python folder holds the training batches and "
                       f"{test_name}; re-download it")
    classes = field(unpickle(path / meta), path / meta, meta_key) if (path / meta).exists() else None
    classes = list(classes) if classes is not None else [str(i) for i in range(k)]

    def split(files: list[str]) -> Split:
        xs, ys = [], []
        for fn in files:
            d = unpickle(path / fn)
            x = np.asarray(field(d, path / fn, "data"))
            y = np.asarray(field(d, path / fn, key))
            if (x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or not np.issubdtype(x.dtype, np.integer)
                    or (x.size and (x.min() < 0 or x.max() > 255))):
                raise BadInput(f"{path / fn}: data of shape {x.shape} and type {x.dtype}, expected pixel values "
                               "0-255 as [N, 3072] (32x32 RGB): re-download the dataset")
            x = x.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32)
            _check_split(path / fn, x, y.astype(np.int64, copy=False), (3, 32, 32), len(classes))
            xs.append(x)
            ys.append(y.astype(np.int64))
        return Split(np.concatenate(xs), np.concatenate(ys))

    return split(names), split([test_name]), classes, name


def _load_imagefolder(path: Path, size: int):
    from PIL import Image

    test_dir = next((path / d for d in ("test", "val") if (path / d).is_dir()), None)
    if not (path / "train").is_dir() or test_dir is None:
        raise BadInput(
            f"{path} is not a dataset folder: expected Fashion-MNIST's *-ubyte.gz files, CIFAR python "
            "batches, or an ImageFolder tree with train/ and test/ (or val/) sub-folders"
        )
    classes = sorted(d.name for d in (path / "train").iterdir() if d.is_dir())
    if not classes:
        raise BadInput(f"{path / 'train'} has no class folders: put images in train/<class>/")
    extra = sorted(d.name for d in test_dir.iterdir() if d.is_dir() and d.name not in classes)
    if extra:
        raise BadInput(f"{test_dir} has class folders with no training folder ({', '.join(extra[:5])}): "
                       f"add them to {path / 'train'} or remove them")

    def split(root: Path, need_every_class: bool) -> Split:
        xs, ys = [], []
        for ci, c in enumerate(classes):
            n = len(xs)
            for f in sorted((root / c).glob("*")) if (root / c).is_dir() else []:
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                try:
                    with Image.open(f) as im:
                        img = im.convert("RGB").resize((size, size), Image.BILINEAR)
                except (OSError, ValueError, Image.DecompressionBombError) as e:  # unidentified, truncated
                    raise BadInput(f"{f} is not a readable image ({type(e).__name__}: {str(e)[:80]}): "
                                   "remove or replace it") from None
                xs.append(np.asarray(img, np.uint8).transpose(2, 0, 1))
                ys.append(ci)
            if need_every_class and len(xs) == n:
                raise BadInput(f"class {c!r} has no images in {root / c} ({', '.join(IMAGE_SUFFIXES)}): "
                               "add images or remove the folder")
        if not xs:
            return Split(np.zeros((0, 3, size, size), np.uint8), np.zeros(0, np.int64))
        return Split(np.stack(xs), np.asarray(ys, np.int64))

    return split(path / "train", True), split(test_dir, False), classes, path.name
