"""Data: CIFAR-10/100 as uint8 arrays, splits, label noise, target distributions, a device loader.

`load_dataset` reads `$METABOOK_DATA/<name>.npz` when METABOOK_DATA is set (nothing else then),
else the cache or a checksum-verified download; every file is checked (a bad one raises DataError
naming it). `synthetic` data only when asked for by name. The loader keeps a split on the device
as uint8 (airbench's idea), augments batches there, and seeds epoch e's randomness with
(seed, e), so an epoch replays exactly from any batch (bitwise resume).
"""
from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .config import NOISE_KINDS, ConfigError

DATASETS = ("cifar10", "cifar100", "cifar100_coarse", "synthetic")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "cifar100_coarse": 20}
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DataError(ValueError):
    """A data file that cannot be used (unreadable, missing keys, wrong dtype, shape or labels).
    The message is one line naming the file, what is wrong and the fix."""


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor   # (N, 32, 32, 3) uint8, NHWC, on the CPU
    y_train: torch.Tensor   # (N,) int64
    x_test: torch.Tensor    # (M, 32, 32, 3) uint8
    y_test: torch.Tensor    # (M,) int64
    class_names: list
    synthetic: bool
    source: str             # where the arrays came from (a path, or "generated from seed S")
    file_key: tuple | None = field(default=None, repr=False, compare=False)  # (path, size, mtime, name) read
    x_heldout: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 32, 32, 3, dtype=torch.uint8))
    y_heldout: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))  # (H,) see heldout_indices

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict:
        return {"name": self.name, "synthetic": self.synthetic, "source": self.source,
                "train_size": len(self.y_train), "test_size": len(self.y_test),
                "heldout_available": len(self.y_heldout), "num_classes": self.num_classes}


def find_npz(name: str, download: bool = True) -> Path:
    """The .npz of a dataset: METABOOK_DATA's, the cache's, or (download=True) a download."""
    from . import download as dl

    if download:
        return dl.fetch_npz(name.split("_")[0])
    filename = f"{name.split('_')[0]}.npz"
    from_env = dl.data_dir_npz(filename)       # METABOOK_DATA set but wrong: FileNotFoundError
    if from_env:
        return from_env
    cached = dl.default_cache_dir() / filename
    if cached.exists():
        return cached
    raise FileNotFoundError(
        f"{name}: METABOOK_DATA is not set and {cached} does not exist; set METABOOK_DATA to a "
        f"directory holding {filename} (keys x_train, y_train, x_test, y_test), or allow the download.")


def check_arrays(arrays: dict, name: str) -> None:
    """Raise DataError (without the file's name: the caller adds it) unless `arrays` is a usable
    dataset `name`: keys x_train/y_train/x_test/y_test, uint8 images (N, 32, 32, 3), one integer
    label per image, labels in 0..C-1 and, if class names are given, C of them."""
    classes = NUM_CLASSES[name]
    coarse = "_coarse" if name == "cifar100_coarse" else ""
    wanted = ["x_train", f"y_train{coarse}", "x_test", f"y_test{coarse}"]
    missing = [k for k in wanted if k not in arrays]
    if missing:
        raise DataError(f"has no {', '.join(missing)} (it has: {', '.join(sorted(arrays)) or 'nothing'}); "
                        f"expected the keys {', '.join(wanted)}")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}{coarse}"]
        if x.dtype != np.uint8:
            raise DataError(f"x_{split} has dtype {x.dtype}; expected uint8 pixel values 0..255")
        if x.ndim != 4 or x.shape[1:] != (32, 32, 3):
            raise DataError(f"x_{split} has shape {x.shape}; expected (N, 32, 32, 3): 32x32 images, "
                            f"3 colour channels last (NHWC)")
        if len(x) == 0:
            raise DataError(f"x_{split} holds no images")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"y_{split}{coarse} has shape {y.shape} and dtype {y.dtype}; expected (N,) "
                            f"integer class labels")
        if len(y) != len(x):
            raise DataError(f"y_{split}{coarse} has {len(y)} labels for the {len(x)} images of x_{split}")
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= classes:
            raise DataError(f"y_{split}{coarse} has labels from {low} to {high}; {name} has {classes} "
                            f"classes, labelled 0..{classes - 1}")
    names = arrays.get(f"{coarse[1:]}_class_names" if coarse else "class_names")
    if names is not None and len(names) != classes:
        raise DataError(f"has {len(names)} class names; {name} has {classes} classes")


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


@lru_cache(maxsize=2)
def _read_npz(key: tuple, name: str) -> tuple:
    """(x_train, y_train, x_test, y_test, class names or None) of the file key[0], checked.
    Keyed by (path, size, mtime), so a file replaced on disk is read (and checked) again."""
    coarse = name == "cifar100_coarse"
    try:
        with open(key[0], "rb") as fh:          # ours to close, even when numpy fails
            f = np.load(fh, allow_pickle=False)
            if not isinstance(f, np.lib.npyio.NpzFile):
                raise DataError("is a single array (.npy), not an .npz archive of x_train, y_train, ...")
            arrays = {k: f[k] for k in f.files}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"cannot be read as an .npz archive ({type(err).__name__}: "
                        f"{' '.join(str(err).split())})") from None
    check_arrays(arrays, name)
    names = arrays.get("coarse_class_names" if coarse else "class_names")
    names = [str(s) for s in names] if names is not None else [f"class{i}" for i in range(NUM_CLASSES[name])]
    suffix = "_coarse" if coarse else ""
    return arrays["x_train"], arrays["y_train" + suffix], arrays["x_test"], arrays["y_test" + suffix], names


def read_checked(path: Path, name: str) -> tuple:
    """`_read_npz` with the file's name and the fix in any DataError: a file in METABOOK_DATA
    is the user's to fix; a broken file in the cache is deleted and made again."""
    try:
        key = _file_key(path)
        return key, _read_npz(key, name)
    except DataError as err:
        if os.environ.get("METABOOK_DATA"):
            fix = "fix or replace this file, or unset METABOOK_DATA to use the cache or a download"
        else:
            fix = "it is a corrupt cached file: delete it, and the next run downloads it again"
        raise DataError(f"{path}: {err}; {fix}") from None


def dataset_fingerprint(ds: Dataset) -> str:
    """16 hex digits of a sha256 of the four arrays of `ds` (one changed pixel or label, another
    hash), so a resume can refuse data that changed. Kept per file (path, size, mtime) read."""
    if ds.file_key is not None and ds.file_key in _FINGERPRINTS:
        return _FINGERPRINTS[ds.file_key]
    h = hashlib.sha256()
    for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test, ds.x_heldout, ds.y_heldout):
        a = np.ascontiguousarray(t.detach().cpu().numpy())
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.reshape(-1).view(np.uint8))
    digest = h.hexdigest()[:16]
    if ds.file_key is not None:
        _FINGERPRINTS[ds.file_key] = digest
    return digest


_FINGERPRINTS: dict[tuple, str] = {}


def make_synthetic(n_train: int = 10000, n_test: int = 2000, num_classes: int = 10,
                   seed: int = 0, n_heldout: int | None = None) -> Dataset:
    """CIFAR-shaped, learnable data: each class is a smooth random colour pattern; an image is its
    class pattern, shifted by up to 4 pixels, scaled in contrast, plus pixel noise. The held-out
    split is `n_heldout` (default n_test) more images, drawn after the test images."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g)
    patterns = torch.nn.functional.interpolate(coarse, size=40, mode="bilinear", align_corners=False)

    def sample(n):
        y = torch.randint(num_classes, (n,), generator=g)
        ox, oy = torch.randint(0, 9, (2, n), generator=g)
        rows = (oy[:, None] + torch.arange(32))[:, :, None]
        cols = (ox[:, None] + torch.arange(32))[:, None, :]
        x = patterns[y[:, None, None], :, rows, cols]                  # (n, 32, 32, 3)
        contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=g)
        x = 0.5 + contrast * (x - 0.5) + 0.25 * torch.randn(n, 32, 32, 3, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    x_train, y_train = sample(n_train)
    x_test, y_test = sample(n_test)
    x_held, y_held = sample(n_test if n_heldout is None else n_heldout)
    return Dataset("synthetic", x_train, y_train, x_test, y_test, [f"class{i}" for i in range(num_classes)],
                   True, f"generated from seed {seed}", x_heldout=x_held, y_heldout=y_held)


def load_dataset(name: str, download: bool = True) -> Dataset:
    """Load a dataset by name (see DATASETS). Real data never falls back to synthetic data."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if name == "synthetic":
        return make_synthetic()
    path = find_npz(name, download=download)
    key, (x_train, y_train, x_test, y_test, names) = read_checked(path, name)
    x_train, y_train = torch.from_numpy(x_train), torch.from_numpy(y_train.astype(np.int64))
    held = heldout_indices(y_train, len(names) if names is not None else int(y_train.max()) + 1)
    keep = torch.ones(len(y_train), dtype=torch.bool)
    keep[held] = False
    return Dataset(name, x_train[keep], y_train[keep], torch.from_numpy(x_test),
                   torch.from_numpy(y_test.astype(np.int64)), names, False, str(path), file_key=(*key, name),
                   x_heldout=x_train[held], y_heldout=y_train[held])


HELDOUT_SIZE, HELDOUT_SEED = 10_000, 31_337


def heldout_indices(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The fixed held-out split of a file's training images, (H,) indices into y: the same number
    from every class, min(10,000, N // 5) in all (all 10,000 for CIFAR's 50,000), drawn by a fixed
    generator (never a run's seed, so every run and preset holds out the same images), in an order
    that cycles through the classes (so its first n images are class-balanced too). Nothing trains
    on them: load_dataset removes them from x_train and keeps them as x_heldout."""
    per = min(HELDOUT_SIZE, len(y) // 5) // num_classes
    per = min(per, int(torch.bincount(y, minlength=num_classes).min()))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(HELDOUT_SEED))
    by_class = torch.stack([perm[y[perm] == c][:per] for c in range(num_classes)])   # (C, per)
    return by_class.t().reshape(-1)


# ----------------------------------------------------------------------------- splits and noise

def split_train_meta(y: torch.Tensor, meta_size: int, train_size: int = 0, seed: int = 0, val_size: int = 0):
    """Split the training images by `seed` into class-balanced `meta` (meta batches) and `val`
    (validation: tuning and val_acc, nothing trains on it) splits and `train`: the rest, or
    `train_size` of it. Returns (train_idx, meta_idx, val_idx), sorted int64 indices into y."""
    n, classes = len(y), int(y.max()) + 1
    if meta_size + val_size + max(train_size, 1) > n:
        raise ConfigError(f"meta_size={meta_size} + val_size={val_size} + train_size={train_size} exceeds the "
                          f"{n} training images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(10_000 + seed))
    taken = torch.zeros(n, dtype=torch.bool)
    splits = []
    for size in (meta_size, val_size):
        per_class = [perm[(y[perm] == c) & ~taken[perm]] for c in range(classes)]
        take = [size // classes + (1 if c < size % classes else 0) for c in range(classes)]
        idx = torch.cat([i[:k] for i, k in zip(per_class, take)])
        taken[idx] = True
        splits.append(idx.sort().values)
    train_idx = perm[~taken[perm]]
    if train_size:
        train_idx = train_idx[:train_size]
    return train_idx.sort().values, splits[0], splits[1]


def corrupt_labels(y: torch.Tensor, kind: str, rate: float, num_classes: int, seed: int = 0):
    """Label noise. Returns (y_noisy, corrupted) where corrupted is a bool mask of changed labels.

    symmetric: each label, with probability `rate`, becomes a uniformly drawn *different* class.
    uniform:   each label, with probability `rate`, is redrawn uniformly from all C classes, so it
               stays right with probability 1/C (MW-Net's convention: 40% uniform = 36% wrong on C=10).
    pairflip:  each label, with probability `rate`, becomes the next class, (c + 1) mod C.
    `corrupted` marks the labels that differ from the true ones.
    """
    if kind not in NOISE_KINDS:
        raise ConfigError(f"unknown noise kind {kind!r}; choose one of: {', '.join(NOISE_KINDS)}")
    if not 0 <= rate < 1:
        raise ConfigError(f"noise rate {rate} is not valid; it must be in [0, 1)")
    g = torch.Generator().manual_seed(20_000 + seed)
    corrupted = (torch.rand(len(y), generator=g) < rate) if kind != "none" else torch.zeros(len(y), dtype=torch.bool)
    if kind == "symmetric":
        shift = torch.randint(1, num_classes, (len(y),), generator=g)
    elif kind == "uniform":
        shift = torch.randint(0, num_classes, (len(y),), generator=g)
    else:
        shift = torch.ones(len(y), dtype=torch.long)
    y_noisy = torch.where(corrupted, (y + shift) % num_classes, y)
    return y_noisy, y_noisy != y


def class_skewed_weights(num_classes: int, favoured: list[int], ratio: float) -> torch.Tensor:
    """Class probabilities where each favoured class is `ratio` times as likely as the others."""
    w = torch.ones(num_classes)
    w[favoured] = ratio
    return w / w.sum()


def parse_classes(classes: list[int], num_classes: int) -> list[int]:
    """target.classes (a list of ints: the config parses and checks them) sorted without repeats,
    e.g. [5, 3] -> [3, 5]; every class must be in [0, num_classes)."""
    out = sorted(set(classes))
    if any(not 0 <= c < num_classes for c in out):
        raise ConfigError(f"target.classes={classes!r}: every class must be in 0..{num_classes - 1}")
    return out


def target_subset(y: torch.Tensor, class_probs: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Indices into y of a sample of `size` examples whose class frequencies follow `class_probs`
    (a target distribution, e.g. for personalization). Sampled without replacement per class."""
    g = torch.Generator().manual_seed(30_000 + seed)
    counts = torch.floor(class_probs * size).long()
    counts[torch.argsort(class_probs * size - counts, descending=True)[: size - int(counts.sum())]] += 1
    out = []
    for c, k in enumerate(counts.tolist()):
        idx = torch.nonzero(y == c).flatten()
        if k > len(idx):
            raise ConfigError(f"target_subset: class {c} needs {k} examples, only {len(idx)} exist")
        out.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(out).sort().values


# ----------------------------------------------------------------------------- the device loader

@dataclass
class Batch:
    x: torch.Tensor     # (B, 3, 32, 32) float32, normalised
    y: torch.Tensor     # (B,) int64
    idx: torch.Tensor   # (B,) int64 positions in the loader's split (for per-example state)


class DeviceLoader:
    """Batches of one split held on `device` as uint8.

    x: (N, 32, 32, 3) uint8 NHWC; y: (N,) labels. `train=True` shuffles, augments (crop with
    4-pixel zero padding + horizontal flip) and drops the last partial batch.
    """

    def __init__(self, x, y, batch_size, *, train, seed=0, device="cpu", channels_last=False,
                 augment=True, mean=CIFAR_MEAN, std=CIFAR_STD):
        device = torch.device(device)
        self.x = x.to(device).permute(0, 3, 1, 2).contiguous()         # (N, 3, 32, 32) uint8
        self.y = y.to(device)
        self.batch_size, self.train, self.seed, self.device = batch_size, train, seed, device
        self.augment = train and augment
        self.channels_last = channels_last
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self._plan = (None, None)                                        # (epoch, its plan)

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def epoch_plan(self, epoch: int):
        """The permutation, crop offsets and flips of one epoch, from a CPU generator seeded by
        (seed, epoch) (the same numbers on any device), moved to the device once per epoch and
        kept, so asking for it batch by batch neither redraws nor copies it."""
        n = len(self.y)
        if not self.train:
            return torch.arange(n, device=self.device), None, None
        if self._plan[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=g)
            offsets = torch.randint(0, 9, (n, 2), generator=g)
            flips = torch.rand(n, generator=g) < 0.5
            self._plan = (epoch, tuple(t.to(self.device) for t in (perm, offsets, flips)))
        return self._plan[1]

    def epoch(self, epoch: int, start: int = 0):
        """Iterate over the batches of `epoch`, beginning at batch number `start`."""
        perm, offsets, flips = self.epoch_plan(epoch)
        for b in range(start, len(self)):
            idx = perm[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.x[idx]
            if self.augment:
                x = augment_batch(x, offsets[idx], flips[idx])
            yield Batch(self.normalise(x), self.y[idx], idx)

    def normalise(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = (x_uint8.float() - self.mean) / self.std
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)


def augment_batch(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Random crop of a zero-padded (pad 4) batch, then horizontal flip, in one gather.

    x: (B, C, 32, 32); offsets: (B, 2) ints in [0, 8] (row, col); flips: (B,) bool.
    """
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    rows = (offsets[:, 0:1] + torch.arange(h, device=x.device))[:, :, None]   # (B, H, 1)
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)                  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)[:, None, :]        # (B, 1, W)
    out = padded[torch.arange(b, device=x.device)[:, None, None], :, rows, cols]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)
