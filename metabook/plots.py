"""Figures the chapters share. Each function draws on axes it is given and returns nothing."""
from __future__ import annotations


def provenance_label(record: dict) -> str:
    """'preset cpu, 1 seed, cpu (x86_64, 2 threads), commit abc1234, 2026-11-23' for a caption."""
    p = record.get("provenance", {})
    seeds = len(record.get("seeds", [record.get("seed")]))
    return (f"preset {record.get('preset')}, {seeds} seed{'s' if seeds > 1 else ''}, {p.get('device')}, "
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
