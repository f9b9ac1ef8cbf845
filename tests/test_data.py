"""Data: sources, splits, label noise, target subsets and the device loader."""
import os

import pytest
import torch

from metabook import data as D
from metabook.config import ConfigError

REAL = os.environ.get("METABOOK_DATA")


@pytest.mark.skipif(not REAL, reason="METABOOK_DATA is not set (CI sets it); synthetic tests below run instead")
def test_real_cifar10_loads_with_its_documented_labels():
    ds = D.load_dataset("cifar10", download=False)
    assert not ds.synthetic
    assert ds.x_train.shape == (40000, 32, 32, 3) and ds.x_train.dtype == torch.uint8
    assert ds.x_heldout.shape == (10000, 32, 32, 3)
    assert torch.bincount(ds.y_heldout).tolist() == [1000] * 10
    import numpy as np
    assert np.load(D.find_npz("cifar10", download=False))["y_train"][:5].tolist() == [6, 9, 9, 4, 1]
    assert ds.y_test[:5].tolist() == [3, 8, 8, 0, 6]
    assert len(ds.y_test) == 1000 and ds.describe()["test_size"] == 1000
    assert ds.class_names[0] == "airplane"


def test_missing_data_raises_an_error_naming_metabook_data(monkeypatch, tmp_path):
    monkeypatch.setenv("METABOOK_DATA", str(tmp_path))
    monkeypatch.setenv("METABOOK_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="METABOOK_DATA") as err:
        D.load_dataset("cifar10", download=False)
    assert "cifar10.npz" in str(err.value)


def test_cifar100_coarse_reads_the_coarse_labels_of_the_npz(monkeypatch, tmp_path):
    import numpy as np
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cifar100.npz", x_train=rng.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(40) % 100, y_train_coarse=np.arange(40) % 20,
             x_test=np.zeros((5, 32, 32, 3), np.uint8), y_test=np.arange(5), y_test_coarse=np.arange(5),
             class_names=np.array([f"f{i}" for i in range(100)]),
             coarse_class_names=np.array([f"c{i}" for i in range(20)]))
    monkeypatch.setenv("METABOOK_DATA", str(tmp_path))
    coarse = D.load_dataset("cifar100_coarse", download=False)
    fine = D.load_dataset("cifar100", download=False)
    assert coarse.num_classes == 20 and fine.num_classes == 100
    assert coarse.y_train.max() == 19 and fine.y_train.max() == 39


def _arrays(n=64, m=20, **changes):
    """A tiny valid cifar10.npz's arrays; `changes` replace (or, with None, drop) keys."""
    import numpy as np
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y_train=np.arange(n) % 10,
                  x_test=rng.integers(0, 256, (m, 32, 32, 3), dtype=np.uint8), y_test=np.arange(m) % 10)
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


def _write_npz(folder, **changes):
    import numpy as np
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "cifar10.npz", **_arrays(**changes))
    return folder / "cifar10.npz"


def _bad_files():
    import numpy as np
    return [
        ("float-images", dict(x_train=np.random.default_rng(0).random((64, 32, 32, 3), np.float32)),
         "x_train has dtype float32; expected uint8"),
        ("nan-images", dict(x_test=np.full((20, 32, 32, 3), np.nan)), "x_test has dtype float64"),
        ("nchw", dict(x_train=np.zeros((64, 3, 32, 32), np.uint8)), "x_train has shape (64, 3, 32, 32); expected (N, 32, 32, 3)"),
        ("28px", dict(x_test=np.zeros((20, 28, 28, 3), np.uint8)), "x_test has shape (20, 28, 28, 3)"),
        ("grey", dict(x_train=np.zeros((64, 32, 32), np.uint8)), "x_train has shape (64, 32, 32)"),
        ("no-images", dict(x_train=np.zeros((0, 32, 32, 3), np.uint8), y_train=np.zeros(0, np.int64)), "x_train holds no images"),
        ("lengths", dict(y_train=np.arange(60) % 10), "y_train has 60 labels for the 64 images of x_train"),
        ("test-lengths", dict(y_test=np.arange(21) % 10), "y_test has 21 labels for the 20 images of x_test"),
        ("label-10", dict(y_train=np.arange(64) % 11), "y_train has labels from 0 to 10; cifar10 has 10 classes"),
        ("label-negative", dict(y_test=np.arange(20) % 10 - 1), "y_test has labels from -1 to 8"),
        ("float-labels", dict(y_train=(np.arange(64) % 10).astype(np.float32)), "expected (N,) integer class labels"),
        ("one-hot", dict(y_train=np.eye(10, dtype=np.int64)[np.arange(64) % 10]), "y_train has shape (64, 10)"),
        ("missing-key", dict(y_test=None), "has no y_test (it has: x_test, x_train, y_train)"),
        ("class-names", dict(class_names=np.array(["a", "b", "c"])), "has 3 class names; cifar10 has 10 classes"),
    ]


@pytest.mark.parametrize("changes, needle", [c[1:] for c in _bad_files()], ids=[c[0] for c in _bad_files()])
def test_a_bad_data_file_is_rejected_in_one_line_naming_the_file(changes, needle, monkeypatch, tmp_path):
    path = _write_npz(tmp_path / "data", **changes)
    monkeypatch.setenv("METABOOK_DATA", str(tmp_path / "data"))
    with pytest.raises(D.DataError) as err:
        D.load_dataset("cifar10", download=False)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and needle in message and "\n" not in message
    assert "unset METABOOK_DATA" in message


@pytest.mark.parametrize("content, needle", [
    (b"not a zip file", "cannot be read as an .npz archive"),
    ("truncated", "cannot be read as an .npz archive"),
    ("pickled", "cannot be read as an .npz archive"),
    ("npy", "is a single array"),
])
def test_an_unreadable_data_file_is_rejected_naming_the_file(content, needle, monkeypatch, tmp_path):
    import numpy as np
    path = _write_npz(tmp_path)
    if content == "truncated":
        path.write_bytes(path.read_bytes()[:3000])
    elif content == "pickled":
        np.savez(path, **_arrays(), class_names=np.array([{"a": 1}] * 10, dtype=object))
    elif content == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    else:
        path.write_bytes(content)
    monkeypatch.setenv("METABOOK_DATA", str(tmp_path))
    with pytest.raises(D.DataError) as err:
        D.load_dataset("cifar10", download=False)
    assert str(err.value).startswith(f"{path}: ") and needle in str(err.value)
    assert "\n" not in str(err.value)


def test_a_corrupt_cached_file_is_named_with_the_fix(monkeypatch, tmp_path):
    cached = _write_npz(tmp_path / "cache")
    cached.write_bytes(cached.read_bytes()[:-100])
    monkeypatch.delenv("METABOOK_DATA", raising=False)
    monkeypatch.setenv("METABOOK_CACHE", str(tmp_path / "cache"))
    with pytest.raises(D.DataError) as err:
        D.load_dataset("cifar10", download=False)
    assert str(err.value).startswith(f"{cached}: ") and "delete it" in str(err.value)


@pytest.mark.parametrize("setting, needle", [
    ("data/cifar10.npz", "is a file, not a folder; set it to the folder {tmp}/data,"),
    ("data/other.txt", "is a file, not a folder"),
    ("empty", "has no cifar10.npz (expected {tmp}/empty/cifar10.npz)"),
    ("nowhere", "does not exist"),
])
def test_metabook_data_without_the_file_is_refused_not_skipped(setting, needle, monkeypatch, tmp_path):
    """A valid cached file must not be used in its place (nor a download tried)."""
    _write_npz(tmp_path / "data")
    (tmp_path / "data" / "other.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    _write_npz(tmp_path / "cache")
    monkeypatch.setenv("METABOOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("METABOOK_CIFAR_MIRRORS", "http://127.0.0.1:9/")
    monkeypatch.setenv("METABOOK_DATA", str(tmp_path / setting))
    with pytest.raises(FileNotFoundError) as err:
        D.load_dataset("cifar10")
    message = str(err.value)
    assert message.startswith(f"METABOOK_DATA={tmp_path / setting} ") and "\n" not in message
    assert needle.format(tmp=tmp_path) in message and "unset METABOOK_DATA" in message


def test_the_class_count_is_the_datasets_not_the_largest_label(monkeypatch, tmp_path):
    import numpy as np
    _write_npz(tmp_path, y_train=np.arange(64) % 5)
    monkeypatch.setenv("METABOOK_DATA", str(tmp_path))
    assert D.load_dataset("cifar10", download=False).num_classes == 10


def test_a_file_replaced_on_disk_is_read_and_checked_again(monkeypatch, tmp_path):
    import numpy as np
    monkeypatch.setenv("METABOOK_DATA", str(tmp_path))
    path = _write_npz(tmp_path)
    first = D.load_dataset("cifar10", download=False)
    _write_npz(tmp_path, y_train=np.arange(60) % 10)
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))   # a later mtime, whatever the clock
    with pytest.raises(D.DataError, match="60 labels"):
        D.load_dataset("cifar10", download=False)
    assert len(first.y_train) + len(first.y_heldout) == 64


def test_dataset_fingerprint_is_a_content_hash(monkeypatch, tmp_path):
    import numpy as np
    monkeypatch.setenv("METABOOK_DATA", str(tmp_path / "a"))
    _write_npz(tmp_path / "a")
    a = D.load_dataset("cifar10", download=False)
    fp = D.dataset_fingerprint(a)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert D.dataset_fingerprint(D.load_dataset("cifar10", download=False)) == fp   # cached
    x = _arrays()["x_train"]
    x[5, 6, 7, 2] ^= 1                                                              # one pixel
    monkeypatch.setenv("METABOOK_DATA", str(tmp_path / "b"))
    _write_npz(tmp_path / "b", x_train=x)
    assert D.dataset_fingerprint(D.load_dataset("cifar10", download=False)) != fp
    monkeypatch.setenv("METABOOK_DATA", str(tmp_path / "c"))
    _write_npz(tmp_path / "c", y_test=np.roll(np.arange(20) % 10, 1))              # labels only
    assert D.dataset_fingerprint(D.load_dataset("cifar10", download=False)) != fp
    monkeypatch.setenv("METABOOK_DATA", str(tmp_path / "d"))
    _write_npz(tmp_path / "d")                                                      # same content
    assert D.dataset_fingerprint(D.load_dataset("cifar10", download=False)) == fp
    assert D.dataset_fingerprint(D.make_synthetic(50, 10, seed=1)) == D.dataset_fingerprint(D.make_synthetic(50, 10, seed=1))
    assert D.dataset_fingerprint(D.make_synthetic(50, 10, seed=1)) != D.dataset_fingerprint(D.make_synthetic(50, 10, seed=2))


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(ConfigError, match="choose one of: cifar10, cifar100, cifar100_coarse, synthetic"):
        D.load_dataset("mnist")


def test_synthetic_data_is_marked_and_reproducible():
    a, b = D.make_synthetic(200, 50, seed=3), D.make_synthetic(200, 50, seed=3)
    assert a.synthetic and "seed 3" in a.source
    assert torch.equal(a.x_train, b.x_train) and a.x_train.shape == (200, 32, 32, 3)
    assert not torch.equal(a.x_train, D.make_synthetic(200, 50, seed=4).x_train)


def test_meta_and_validation_splits_are_class_balanced_disjoint_and_fixed_by_seed():
    y = torch.arange(1000) % 10
    tr, me, va = D.split_train_meta(y, meta_size=100, seed=1, val_size=50)
    assert len(tr) + len(me) + len(va) == 1000 and len(set(tr.tolist()) | set(me.tolist()) | set(va.tolist())) == 1000
    assert torch.bincount(y[me]).tolist() == [10] * 10 and torch.bincount(y[va]).tolist() == [5] * 10
    tr2, me2, va2 = D.split_train_meta(y, meta_size=100, seed=1, val_size=50)
    assert torch.equal(me, me2) and torch.equal(va, va2) and torch.equal(tr, tr2)
    assert torch.equal(me, D.split_train_meta(y, meta_size=100, seed=1)[1])     # val never moves meta
    assert not torch.equal(me, D.split_train_meta(y, meta_size=100, seed=2)[1])
    assert len(D.split_train_meta(y, meta_size=100, train_size=300, seed=1, val_size=50)[0]) == 300
    with pytest.raises(ConfigError, match="val_size=500"):
        D.split_train_meta(y, meta_size=100, train_size=500, seed=1, val_size=500)


def test_heldout_split_is_fixed_stratified_and_removed_from_training(monkeypatch, tmp_path):
    import numpy as np
    y = torch.randint(10, (5000,), generator=torch.Generator().manual_seed(0))
    held = D.heldout_indices(y, 10)
    assert len(held) == 1000 and torch.equal(held, D.heldout_indices(y, 10))       # N // 5, no seed
    assert torch.bincount(y[held]).tolist() == [100] * 10
    assert torch.bincount(y[held[:50]]).tolist() == [5] * 10                    # prefixes balanced too
    _write_npz(tmp_path, **_arrays(n=500))
    monkeypatch.setenv("METABOOK_DATA", str(tmp_path))
    ds = D.load_dataset("cifar10", download=False)
    x_file = np.load(tmp_path / "cifar10.npz")["x_train"]
    rows = {bytes(r) for r in x_file.reshape(500, -1)}
    train_rows = {bytes(r) for r in ds.x_train.numpy().reshape(len(ds.x_train), -1)}
    held_rows = {bytes(r) for r in ds.x_heldout.numpy().reshape(len(ds.x_heldout), -1)}
    assert len(ds.y_heldout) == 100 and len(ds.y_train) == 400
    assert not train_rows & held_rows and train_rows | held_rows == rows


def test_uniform_noise_redraws_from_all_classes_as_mw_net_counts_it():
    y = torch.arange(50000) % 10
    noisy, mask = D.corrupt_labels(y, "uniform", 0.4, 10, seed=0)
    assert torch.equal(mask, noisy != y)
    assert abs(mask.float().mean().item() - 0.4 * 0.9) < 0.01          # 36% wrong, not 40%
    sym, sym_mask = D.corrupt_labels(y, "symmetric", 0.4, 10, seed=0)
    assert abs(sym_mask.float().mean().item() - 0.4) < 0.01


def test_symmetric_noise_changes_exactly_the_masked_labels_at_the_rate():
    y = torch.arange(20000) % 10
    noisy, mask = D.corrupt_labels(y, "symmetric", 0.4, 10, seed=0)
    assert torch.equal(noisy != y, mask)
    assert abs(mask.float().mean().item() - 0.4) < 0.02
    assert len(torch.unique(noisy[mask & (y == 3)])) == 9          # spread over all other classes


def test_pairflip_noise_moves_labels_to_the_next_class():
    y = torch.arange(10000) % 10
    noisy, mask = D.corrupt_labels(y, "pairflip", 0.3, 10, seed=0)
    assert torch.equal(noisy[mask], (y[mask] + 1) % 10)
    assert torch.equal(noisy[~mask], y[~mask])
    assert abs(mask.float().mean().item() - 0.3) < 0.02


def test_target_subset_follows_the_class_distribution():
    y = torch.arange(5000) % 10
    probs = D.class_skewed_weights(10, favoured=[0, 1], ratio=4.0)
    idx = D.target_subset(y, probs, 600, seed=0)
    counts = torch.bincount(y[idx], minlength=10)
    assert len(idx) == 600 and len(set(idx.tolist())) == 600
    assert counts[0] == counts[1] == 150
    assert all(int(c) in (37, 38) for c in counts[2:])


def _naive_crop_flip(x, offsets, flips):
    out = []
    for img, (r, c), f in zip(x, offsets.tolist(), flips.tolist()):
        padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
        crop = padded[:, r:r + 32, c:c + 32]
        out.append(crop.flip(-1) if f else crop)
    return torch.stack(out)


def test_batched_crop_and_flip_match_a_per_image_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
    offsets = torch.randint(0, 9, (16, 2), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    assert torch.equal(D.augment_batch(x, offsets, flips), _naive_crop_flip(x, offsets, flips))


def test_loader_is_deterministic_for_a_seed_and_replays_an_epoch_from_any_batch():
    ds = D.make_synthetic(300, 10)
    make = lambda seed: D.DeviceLoader(ds.x_train, ds.y_train, 64, train=True, seed=seed)
    a = list(make(0).epoch(2))
    b = list(make(0).epoch(2))
    c = list(make(1).epoch(2))
    assert len(a) == 4                                             # drop_last for training
    assert all(torch.equal(p.x, q.x) and torch.equal(p.idx, q.idx) for p, q in zip(a, b))
    assert not torch.equal(a[0].idx, c[0].idx)
    tail = list(make(0).epoch(2, start=2))
    assert torch.equal(tail[0].x, a[2].x)
    assert torch.equal(a[0].y, ds.y_train[a[0].idx])


def test_eval_loader_keeps_order_and_every_example_without_augmentation():
    ds = D.make_synthetic(130, 10)
    loader = D.DeviceLoader(ds.x_train, ds.y_train, 50, train=False)
    batches = list(loader.epoch(0))
    assert [len(b.y) for b in batches] == [50, 50, 30]
    x0 = (ds.x_train[:50].permute(0, 3, 1, 2).float() - loader.mean) / loader.std
    assert torch.allclose(batches[0].x, x0)


def test_channels_last_loader_gives_the_same_values():
    ds = D.make_synthetic(64, 10)
    a = next(D.DeviceLoader(ds.x_train, ds.y_train, 32, train=True, seed=0).epoch(0))
    b = next(D.DeviceLoader(ds.x_train, ds.y_train, 32, train=True, seed=0, channels_last=True).epoch(0))
    assert b.x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a.x, b.x)
