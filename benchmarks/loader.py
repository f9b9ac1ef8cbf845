"""Throughput of the device loader against a torchvision DataLoader + transforms pipeline.

    python benchmarks/loader.py [--batches 100] [--device cpu|cuda] [--dataset cifar10|synthetic]

Prints images per second of each and the ratio, on this machine. Uses METABOOK_DATA if set.
"""
import argparse
import json

import torch

from metabook.bench import loader_throughput
from metabook.data import load_dataset

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dataset", default="cifar10")
    a = p.parse_args()
    ds = load_dataset(a.dataset)
    r = loader_throughput(ds.x_train, ds.y_train, batches=a.batches, device=a.device)
    r["dataset"] = ds.name + (" (synthetic)" if ds.synthetic else "")
    r["threads"] = torch.get_num_threads()
    print(json.dumps(r, indent=1))
    print(f"device loader {r['ours_img_per_s']:,.0f} img/s, torchvision {r['torchvision_img_per_s']:,.0f} img/s: "
          f"{r['speedup']:.1f}x faster")
