"""Figures the chapters share. Each function draws on axes it is given and returns nothing."""
from __future__ import annotations

from .results import device_label


def provenance_label(record: dict) -> str:
    """'preset cpu, 1 seed, cpu (x86_64, 2 threads), commit abc1234, 2026-11-23' for a caption."""
    p = record.get("provenance", {})
    seeds = len(record.get("seeds", [record.get("seed")]))
    return (f"preset {record.get('preset')}, {seeds} seed{'s' if seeds > 1 else ''}, {device_label(record)}, "
            f"commit {p.get('git_commit')}, {str(p.get('date', ''))[:10]}")


def plot_history(ax_loss, ax_acc, history: list[dict], label: str = "", style: str = "o-") -> None:
    """Training/test loss on ax_loss and train/validation/test accuracy (%) on ax_acc, per epoch."""
    epochs = [h["epoch"] for h in history]
    tag = f" {label}" if label else ""
    ax_loss.plot(epochs, [h["train_loss"] for h in history], style, label=f"train (augmented){tag}")
    ax_loss.plot(epochs, [h["test_loss"] for h in history], style, label=f"test{tag}")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_acc.plot(epochs, [100 * h["train_acc"] for h in history], style, label=f"train (augmented){tag}")
    ax_acc.plot(epochs, [100 * h["val_acc"] for h in history], style, label=f"validation{tag}")
    ax_acc.plot(epochs, [100 * h["test_acc"] for h in history], style, label=f"test{tag}")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_loss.legend(fontsize=7)
    ax_acc.legend(fontsize=7)


def plot_depth_sweep(ax, record: dict, label: str = "") -> None:
    """Test accuracy (%) against depth for the plain and the skip arms of a `depth` record,
    with error bars (std over seeds) when there are several seeds."""
    depths = record["depths"]
    arms = record["arms"]
    for kind, style in (("plain", "o-"), ("skips", "s--")):
        means = [100 * arms[f"{kind}-{d}"]["test_acc"]["mean"] for d in depths]
        stds = [100 * arms[f"{kind}-{d}"]["test_acc"]["std"] for d in depths]
        name = "plain (no skips)" if kind == "plain" else "with skips"
        ax.errorbar(depths, means, yerr=stds, fmt=style, capsize=3, label=f"{name}{' ' + label if label else ''}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.set_xlabel("depth (conv layers)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)


def plot_arms(ax, record: dict, x: str = "epoch", key: str = "test_acc", arms: list[str] | None = None) -> None:
    """`key` of each arm's history (an accuracy `*_acc` shown in %, else as it is, e.g.
    'train_loss') against `x` ('epoch' or 'elapsed_s', shown in minutes), the mean over seeds, with
    the seeds' range as a band when there are several."""
    import numpy as np

    scale = 100 if key.endswith("_acc") else 1
    for name in arms or list(record["arms"]):
        runs = list(record["arms"][name]["history"].values())
        n = min(len(h) for h in runs)
        xs = np.mean([[row[x] for row in h[:n]] for h in runs], axis=0) / (60 if x == "elapsed_s" else 1)
        ys = scale * np.array([[row[key] for row in h[:n]] for h in runs])
        line, = ax.plot(xs, ys.mean(0), "o-", ms=3, label=name)
        if len(runs) > 1:
            ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training time (min)" if x == "elapsed_s" else x)
    ax.set_ylabel(key.replace("_", " ") + (" (%)" if scale == 100 else ""))
    ax.legend(fontsize=7)


def plot_rate_histogram(ax, rate, corrupted) -> None:
    """Histograms (log-spaced bins) of per-example learning rates, clean vs corrupted labels.
    rate: (N,) positive; corrupted: (N,) bool."""
    import numpy as np

    rate, corrupted = np.asarray(rate), np.asarray(corrupted, dtype=bool)
    bins = np.geomspace(max(rate.min(), 1e-3), rate.max() * 1.01, 40)
    ax.hist(rate[~corrupted], bins=bins, alpha=0.6, label=f"clean ({(~corrupted).sum():,})")
    if corrupted.any():
        ax.hist(rate[corrupted], bins=bins, alpha=0.6, label=f"corrupted ({corrupted.sum():,})")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter
    ax.xaxis.set_minor_formatter(NullFormatter())          # label only the powers of ten
    ax.set_xlabel("learned learning-rate multiplier $r_i$")
    ax.set_ylabel("examples")
    ax.legend(fontsize=7)
