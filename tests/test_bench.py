"""The cost measurements the book reports."""
import torch
import torch.nn.functional as F

from metabook.bench import _step_setup, loader_throughput, meta_step_cost, peak_autograd_bytes
from metabook.data import make_synthetic


def test_peak_autograd_memory_counts_coexisting_graphs_not_sequential_ones():
    model, opt, x, y, xm, ym = _step_setup("small_cnn", 8, 16, False, torch.device("cpu"), 0)

    def one():
        F.cross_entropy(model(x), y).backward()

    def two_in_a_row():
        one()
        one()

    def two_at_once():
        (F.cross_entropy(model(x), y) + F.cross_entropy(model(xm), ym)).backward()

    single = peak_autograd_bytes(one)
    assert single > 0
    assert peak_autograd_bytes(two_in_a_row) == single
    assert abs(peak_autograd_bytes(two_at_once) - 2 * single) < 0.05 * single


def test_meta_step_cost_reports_time_and_memory_ratios():
    r = meta_step_cost("small_cnn", width=8, batch_size=16, repeats=2, mode="exact")
    assert r["plain_step_s"] > 0 and r["meta_step_s"] > 0
    assert r["ratio"] == r["meta_step_s"] / r["plain_step_s"]
    assert r["memory_ratio"] > 1.5                      # the double backward keeps a second graph


def test_loader_throughput_compares_both_pipelines_on_the_same_images():
    ds = make_synthetic(512, 10)
    r = loader_throughput(ds.x_train, ds.y_train, batch_size=64, batches=4)
    assert r["images"] == 256
    assert r["ours_img_per_s"] > 0 and r["torchvision_img_per_s"] > 0
    assert r["speedup"] == r["ours_img_per_s"] / r["torchvision_img_per_s"] or abs(
        r["speedup"] - r["ours_img_per_s"] / r["torchvision_img_per_s"]) < 1e-9
