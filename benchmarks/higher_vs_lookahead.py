"""Our lookahead meta step against the same step written with the `higher` library.

    pip install higher            # only for this benchmark; the book never imports it
    python benchmarks/higher_vs_lookahead.py [--model small_cnn] [--rounds 20] [--out DIR]

The step is one Learning-to-Reweight step (chapter 1): per-example weights eps = 0 enter the
training loss, one virtual SGD step, the meta loss on a held-out batch, d meta / d eps, weights
w = max(-grad, 0) normalised, then the real step on sum_i w_i l_i. Written three ways, on the
same model, batch and meta batch, timed in interleaved rounds (each round runs every variant once,
so a change of the machine's load hits all alike; medians over the rounds):

  higher         higher.innerloop_ctx: a patched functional copy of the model and a differentiable
                 SGD; d meta / d eps by a double backward through the virtual step
  ours_exact     metabook.meta.reweighting_step(mode="exact"): the same maths on torch.func
                 (functional_call, one double backward)
  ours_jvp       mode="jvp": the same numbers by one forward-mode product (no double backward)

Before timing, the three are run once from identical copies of the model and their weights are
compared (they must agree to float32 rounding). Peak memory: bench.peak_tensor_bytes on CPU (the
peak bytes of the tensors a step creates), torch.cuda.max_memory_allocated above the start on CUDA;
and, on any device, bench.peak_autograd_bytes (the bytes the graphs hold for backward).
Writes OUT/result.json (default metabook/records/compare-higher/) with provenance.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import time

import torch
import torch.nn.functional as F

from metabook.bench import peak_autograd_bytes, peak_step_bytes
from metabook.meta import reweighting_step
from metabook.models import build_model
from metabook.results import provenance, write_result


def higher_reweighting_step(model, opt, x, y, x_meta, y_meta, lr: float) -> dict:
    """The Learning-to-Reweight step with higher (imported here only)."""
    import higher

    inner_opt = torch.optim.SGD(model.parameters(), lr=lr)
    with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False, track_higher_grads=True) as (fmodel, diffopt):
        losses = F.cross_entropy(fmodel(x), y, reduction="none")             # (B,)
        eps = torch.zeros_like(losses, requires_grad=True)
        diffopt.step((eps * losses).sum())                                     # virtual step
        meta = F.cross_entropy(fmodel(x_meta), y_meta)
        (g_eps,) = torch.autograd.grad(meta, eps)
    w = torch.clamp(-g_eps.detach(), min=0)
    w = w / w.sum() if w.sum() > 0 else w
    losses = F.cross_entropy(model(x), y, reduction="none")                    # the real step
    opt.zero_grad(set_to_none=True)
    (w * losses).sum().backward()
    opt.step()
    return {"weights": w}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="metabook/records/compare-higher")
    a = p.parse_args()
    dev = torch.device(a.device)
    lr = 0.1

    torch.manual_seed(0)
    model = build_model(a.model, 10, a.width).to(dev)
    x, xm = torch.randn(2, a.batch_size, 3, 32, 32, device=dev)
    y, ym = torch.randint(10, (2, a.batch_size), device=dev)

    def variant(name):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        if name == "higher":
            return lambda: higher_reweighting_step(m, opt, x, y, xm, ym, lr)
        mode = name.split("_")[1]
        return lambda: reweighting_step(m, opt, x, y, xm, ym, lr, mode=mode)

    names = ("higher", "ours_exact", "ours_jvp")
    # Agreement: the first step of each from the same weights.
    weights = {n: variant(n)()["weights"] for n in names}
    agreement = {n: float((weights[n] - weights["higher"]).abs().max()) for n in names[1:]}

    steps = {n: variant(n) for n in names}
    times = {n: [] for n in names}
    for r in range(a.warmup + a.rounds):
        for n in names:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            steps[n]()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if r >= a.warmup:
                times[n].append(time.perf_counter() - t0)
    median = {n: sorted(t)[len(t) // 2] for n, t in times.items()}

    memory, saved = {}, {}
    for n in names:
        step = variant(n)
        step()                                     # optimiser state exists, as in training
        memory[n], memory_kind = peak_step_bytes(step, dev)
        saved[n] = peak_autograd_bytes(step)          # what the graphs hold for backward, any device
    record = {
        "chapter": "compare", "method": "higher_vs_lookahead", "preset": "benchmark",
        "config": {"model": a.model, "width": a.width, "batch_size": a.batch_size, "rounds": a.rounds,
                   "warmup": a.warmup, "lr": lr, "device": str(dev)},
        "higher_version": importlib.metadata.version("higher"),
        "max_weight_difference_vs_higher": agreement,
        "seconds_per_step": median, "per_round_seconds": times,
        "time_ratio_vs_higher": {n: median[n] / median["higher"] for n in names},
        "peak_bytes": memory, "memory_ratio_vs_higher": {n: memory[n] / memory["higher"] for n in names},
        "saved_for_backward_bytes": saved,
        "saved_ratio_vs_higher": {n: saved[n] / saved["higher"] for n in names},
        "memory_kind": memory_kind,
        "provenance": provenance(dev),
    }
    path = write_result(record, a.out)
    for n in names:
        print(f"{n:>11}: {1e3 * median[n]:7.1f} ms/step ({record['time_ratio_vs_higher'][n]:.2f}x higher), "
              f"peak {memory[n] / 2**20:6.1f} MiB ({record['memory_ratio_vs_higher'][n]:.2f}x), saved for backward "
              f"{saved[n] / 2**20:6.1f} MiB ({record['saved_ratio_vs_higher'][n]:.2f}x)"
              + (f", max |w - w_higher| {agreement[n]:.1e}" if n in agreement else ""))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
