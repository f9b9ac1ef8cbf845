"""Cost of one lookahead meta step (Learning-to-Reweight) relative to a plain SGD step.

    python benchmarks/meta_step.py [--model small_cnn] [--repeats 10] [--device cpu|cuda]

Measures both memory layouts (NCHW and channels_last) and three ways to get the meta-gradient
(exact: double backward; jvp: exact, forward mode; fd: one-sided finite difference), each
against a plain step of the same model and batch.
"""
import argparse
import json

import torch

from metabook.bench import meta_step_cost

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    rows = []
    for channels_last in (False, True):
        for mode in ("exact", "jvp", "fd"):
            r = meta_step_cost(a.model, channels_last=channels_last, mode=mode,
                               repeats=a.repeats, device=a.device)
            rows.append(r)
            print(f"{'channels_last' if channels_last else 'NCHW':>13}  {mode:>5}  "
                  f"plain {r['plain_step_s'] * 1e3:7.1f} ms  meta {r['meta_step_s'] * 1e3:7.1f} ms  "
                  f"ratio {r['ratio']:.2f}x | peak autograd memory {r['plain_autograd_bytes'] / 2**20:.0f} -> "
                  f"{r['meta_autograd_bytes'] / 2**20:.0f} MiB ({r['memory_ratio']:.2f}x)", flush=True)
    print(json.dumps(rows, indent=1))
