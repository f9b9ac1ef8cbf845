"""All five methods side by side: the same data, budget and seeds; accuracy against cost.

    python -m metabook bench --preset cpu --seeds 2          (= python -m metabook run compare ...)

Each method keeps its own chapter's setting at the same preset (its model, learning rate and
method knobs: local losses need a plain deep net, Grad-Instructor an MLP, MLHF the CUDA-convnet),
and the bench imposes what must be equal for a fair table: the training images, meta/validation
images, test images, epochs, batch size and seeds. A method that targets label noise
(instance_lr) runs under compare.noise_kind / compare.noise_rate, and so does its baseline; the
others train on clean labels.

Every method is paired with its own chapter's baseline (plain SGD on the same model, same data,
same seeds) and with that baseline given the method's wall-clock (`baseline_same_time`), in one
`run_arms` call per method, so every ratio in the table is measured in the same run:

    step cost ratio  = median seconds per step of the method / of its baseline
    total time ratio = (training seconds + one-off seconds outside training) / baseline's training seconds
    memory ratio     = peak memory of the first two steps of the method / of its baseline, same model
                       and batches (CPU: the peak bytes of the tensors they create,
                       bench.peak_tensor_bytes; CUDA: max_memory_allocated above the start)

One-off stages: AdaLFL's offline initialisation and MLHF's meta-training run inside the method's
first step, so they are in its training seconds (and in the budget of its baseline_same_time);
Grad-Instructor's evaluation network is trained before training starts, once for all seeds (the
paper amortises it over target nets), so it is added to the total time ratio but not to the
same-time budget. Each method's run_arms record is written to OUT/<method>/arms.json, its finished
(arm, seed) runs to OUT/<method>/runs/ (a killed bench resumes there).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from ..config import ConfigError

# Row name -> (chapter, the chapter's method arm). The order is the book's.
METHODS: dict = {
    "local_losses": ("local_losses", "meta"),
    "instance_lr": ("instance_lr", "instance_lr"),
    "online_loss": ("online_loss", "online_loss"),
    "grad_instructor": ("grad_instructor", "grad_instructor"),
    "meta_hf": ("meta_hf", "mlhf"),
}
NOISE_TARGETING = ("instance_lr",)
# The keys the bench sets for every method alike (its budget); everything else is the chapter's.
SHARED_KEYS = ("dataset", "train_size", "meta_size", "test_size", "epochs", "batch_size", "device",
               "eval_every", "checkpoint_every", "augment")
# For the one-step memory probe only: one-off stages cut to a single episode/step (their peak is
# reached in one), so the probe does not repeat minutes of meta-training.
MEMORY_PROBE = {"hf.mlhf_meta_steps": 1, "lfl.offline_steps": 1}

DEFAULTS: dict = {
    "compare.methods": ",".join(METHODS),
    "compare.noise_kind": "symmetric",   # label noise for the noise-targeting methods and their baseline
    "compare.noise_rate": 0.4,
}
PRESETS: dict = {
    # CI: seconds per method (8 steps per arm), each method at its chapter's smoke setting.
    "smoke": {"train_size": 1000, "meta_size": 200, "test_size": 500, "epochs": 1.0, "checkpoint_every": 50},
    # 2 CPU cores: 5,000 images x 3 epochs = 117 steps per arm. A short budget: every method gets
    # the same few steps, so the table is about the start of training (said where it is shown).
    "cpu": {"train_size": 5000, "epochs": 3.0},
    # Not measured on a GPU yet.
    "gpu": {"epochs": 15.0},
    "paper": {"epochs": 100.0},
}


def parse_methods(text: str) -> list[str]:
    """'local_losses,meta_hf' -> ['local_losses', 'meta_hf'] (in the book's order)."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ConfigError(f"compare.methods={text!r}: choose one or more of {', '.join(METHODS)} "
                          f"(comma-separated)")
    return [n for n in METHODS if n in names]


def method_config(name: str, cfg: dict) -> dict:
    """The chapter's config at the bench's preset, with the bench's budget and noise imposed."""
    from ..config import validate
    from . import chapter_config

    chapter, _ = METHODS[name]
    mcfg = chapter_config(chapter, cfg["preset"])
    mcfg.update({k: cfg[k] for k in SHARED_KEYS})
    noisy = name in NOISE_TARGETING
    mcfg["noise.kind"] = cfg["compare.noise_kind"] if noisy else "none"
    mcfg["noise.rate"] = cfg["compare.noise_rate"] if noisy else 0.0
    return validate(mcfg)


def method_arms(name: str, mcfg: dict, seeds: list[int], dataset, out_dir, progress: bool):
    """(arms {'baseline': factory, method arm: factory}, arm_configs, one-off seconds, info) of a row."""
    from . import grad_instructor, instance_lr, local_losses, meta_hf, online_loss

    chapter, arm = METHODS[name]
    if name == "local_losses":
        base, meth = local_losses.ARMS["baseline"], local_losses.ARMS[arm]
        return {"baseline": base[0], arm: meth[0]}, {"baseline": base[1], arm: meth[1]}, 0.0, {}
    if name == "instance_lr":
        return {"baseline": instance_lr.NoisyBaseline, arm: instance_lr.InstanceLR}, {}, 0.0, {}
    if name == "online_loss":
        return {"baseline": online_loss.Baseline, arm: online_loss.OnlineLoss}, {}, 0.0, {}
    if name == "grad_instructor":
        arms, info = grad_instructor.make_arms(mcfg, seeds, dataset, out_dir, progress)
        return {"baseline": arms["baseline"], arm: arms[arm]}, {}, float(info["seconds"]), \
            {"enn_spearman_all": info.get("spearman_all")}
    return {"baseline": meta_hf.Baseline, arm: meta_hf.MLHF}, {}, 0.0, {}


def step_memory(arms: dict, arm_configs: dict, mcfg: dict, dataset, seed: int = 0) -> dict:
    """Peak memory of each arm's first two training steps (one-off stages cut to one episode, see
    MEMORY_PROBE), same model and batches: {arm: bytes}, and the kind of measurement."""
    from ..bench import peak_step_bytes
    from ..config import pick_device
    from ..train import _meta_batch_at, make_model, prepare_data, seed_everything

    device = pick_device(mcfg["device"])
    data = prepare_data(mcfg, seed, device, dataset)
    out = {}
    for name, factory in arms.items():
        cfg = {**mcfg, **arm_configs.get(name, {}), **{k: v for k, v in MEMORY_PROBE.items() if k in mcfg}}
        for _ in range(2):       # the first pass fills the process's one-time caches; the second counts
            seed_everything(seed)
            method = factory(cfg)
            method.setup(make_model(cfg, dataset.num_classes, device), data, cfg)

            def two_steps():
                for step in range(2):
                    batch = next(data.train.epoch(0, start=step))
                    method.step(batch, _meta_batch_at(data.meta, step) if method.uses_meta else None, cfg["lr"])

            out[name], kind = peak_step_bytes(two_steps, device)
    return {"bytes": out, "kind": kind}


def run(cfg: dict, seeds: list[int], out_dir=None, progress: bool = True, dataset=None) -> dict:
    """Every method of cfg['compare.methods'] against its baseline and its baseline at equal
    wall-clock, same budget and seeds; the record's `rows` hold the table (see `table`)."""
    from ..config import pick_device
    from ..data import load_dataset
    from ..results import provenance, write_json
    from ..train import run_arms

    names = parse_methods(cfg["compare.methods"])
    dataset = dataset or load_dataset(cfg["dataset"])
    out = Path(out_dir) if out_dir else None
    rows, sub_records = {}, {}
    for name in names:
        chapter, arm = METHODS[name]
        mcfg = method_config(name, cfg)
        sub = out / name if out else None
        arms, arm_configs, one_off_s, info = method_arms(name, mcfg, seeds, dataset, sub, progress)
        rec = run_arms(chapter, arm, arms, mcfg, seeds, out_dir=sub, progress=progress, dataset=dataset,
                       same_time_for=arm, arm_configs=arm_configs)
        memory = step_memory(arms, arm_configs, mcfg, dataset, seeds[0])
        rec["step_memory"] = memory
        if sub:          # arms.json, not result.json: the chapters' own record finders must not pick it up
            write_json(rec, sub / "arms.json")
        rows[name] = summarise(name, rec, memory, one_off_s, info)
        sub_records[name] = {"config": mcfg, "dataset": rec["dataset"]}
    first = sub_records[names[0]]["dataset"]
    return {"chapter": "compare", "method": "compare", "preset": cfg["preset"], "seed": seeds[0],
            "seeds": list(seeds), "config": cfg, "dataset": first, "rows": rows,
            "method_configs": {n: r["config"] for n, r in sub_records.items()},
            "metrics": {f"{n}_delta": r["delta"]["mean"] for n, r in rows.items()},
            "provenance": provenance(pick_device(cfg["device"]))}


def summarise(name: str, rec: dict, memory: dict, one_off_s: float, info: dict) -> dict:
    """One row of the table from a method's run_arms record."""
    from ..results import seed_stats

    chapter, arm = METHODS[name]
    a, b, s = rec["arms"][arm], rec["arms"]["baseline"], rec["arms"]["baseline_same_time"]
    delta = seed_stats([m - n for m, n in zip(a["test_acc"]["per_seed"], b["test_acc"]["per_seed"])])
    delta_same = seed_stats([m - n for m, n in zip(a["test_acc"]["per_seed"], s["test_acc"]["per_seed"])])
    cfg = rec["config"]
    return {
        "method": name, "chapter": chapter, "arm": arm, "model": cfg["model"],
        "depth": cfg["depth"], "width": cfg["width"],
        "noise": f"{cfg['noise.kind']} {cfg['noise.rate']:.0%}" if cfg["noise.kind"] != "none" else "none",
        "test_acc": a["test_acc"], "baseline_acc": b["test_acc"], "same_time_acc": s["test_acc"],
        "delta": delta, "delta_same_time": delta_same,
        "steps": a["steps"], "same_time_steps": s["steps"],
        "same_time_stopped_early": s["stopped_early"],
        "seconds_per_step": a["seconds_per_step"], "baseline_seconds_per_step": b["seconds_per_step"],
        "step_cost_ratio": a["step_cost_ratio"],
        "train_seconds": a["train_seconds"]["mean"], "baseline_train_seconds": b["train_seconds"]["mean"],
        "one_off_seconds": one_off_s,
        "total_time_ratio": (a["train_seconds"]["mean"] + one_off_s) / b["train_seconds"]["mean"],
        "memory_bytes": memory["bytes"][arm], "baseline_memory_bytes": memory["bytes"]["baseline"],
        "memory_ratio": memory["bytes"][arm] / max(memory["bytes"]["baseline"], 1),
        "memory_kind": memory["kind"], **info,
    }


def table(record: dict) -> list[dict]:
    """The bench's table, one row per method (accuracies in %, mean ± std over the seeds)."""
    pm = lambda st: f"{100 * st['mean']:.1f} ± {100 * st['std']:.1f}"
    rows = []
    for r in record["rows"].values():
        rows.append({"method": r["method"], "model": r["model"], "noise": r["noise"],
                     "test acc": pm(r["test_acc"]), "baseline": pm(r["baseline_acc"]),
                     "Δ": f"{100 * r['delta']['mean']:+.1f}",
                     "baseline same time": pm(r["same_time_acc"]),
                     "time/step": f"{r['step_cost_ratio']:.2f}x", "total time": f"{r['total_time_ratio']:.2f}x",
                     "memory": f"{r['memory_ratio']:.2f}x"})
    return rows
