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
    assert ds.x_train.shape == (50000, 32, 32, 3) and ds.x_train.dtype == torch.uint8
    assert ds.y_train[:5].tolist() == [6, 9, 9, 4, 1]
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


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(ConfigError, match="choose one of: cifar10, cifar100, cifar100_coarse, synthetic"):
        D.load_dataset("mnist")


def test_synthetic_data_is_marked_and_reproducible():
    a, b = D.make_synthetic(200, 50, seed=3), D.make_synthetic(200, 50, seed=3)
    assert a.synthetic and "seed 3" in a.source
    assert torch.equal(a.x_train, b.x_train) and a.x_train.shape == (200, 32, 32, 3)
    assert not torch.equal(a.x_train, D.make_synthetic(200, 50, seed=4).x_train)


def test_meta_split_is_class_balanced_disjoint_and_fixed_by_seed():
    y = torch.arange(1000) % 10
    tr, me = D.split_train_meta(y, meta_size=100, seed=1)
    assert len(set(tr.tolist()) & set(me.tolist())) == 0 and len(tr) + len(me) == 1000
    assert torch.bincount(y[me]).tolist() == [10] * 10
    tr2, me2 = D.split_train_meta(y, meta_size=100, seed=1)
    assert torch.equal(me, me2)
    assert not torch.equal(me, D.split_train_meta(y, meta_size=100, seed=2)[1])
    assert len(D.split_train_meta(y, meta_size=100, train_size=300, seed=1)[0]) == 300


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
