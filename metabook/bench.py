"""Cost meters: the memory of a step (the one meter the runner uses, `peak_step_bytes`), a
lookahead meta step against a plain step, and the loader against torchvision.

Chapters 1, 2 and 8, the runner and the scripts in benchmarks/ use them, so the book and the
command line report the same measurement. Timings are medians over repeated steps after a warm-up.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .data import DeviceLoader
from .meta import reweighting_step
from .models import build_model


def _median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


class _LiveStorages:
    """The bytes of the storages that tracked tensors use right now, and their peak: a storage
    counts once, from the first tracked tensor on it until the last of them is freed."""

    def __init__(self):
        self.size, self.refs, self.now, self.peak = {}, {}, 0, 0

    def track(self, t: torch.Tensor) -> torch.Tensor:
        import weakref

        if isinstance(t, torch._subclasses.FakeTensor):     # torch.func.linearize traces with these: no memory
            return t
        try:
            storage = t.untyped_storage()
            key, nbytes = (t.device.type, storage.data_ptr()), storage.nbytes()
        except RuntimeError:          # no plain storage (e.g. a dual tensor of forward mode): its own size
            key, nbytes = ("id", id(t)), t.numel() * t.element_size()
        if key not in self.size:
            self.size[key], self.refs[key] = nbytes, 0
            self.now += nbytes
            self.peak = max(self.peak, self.now)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)
        return t

    def _release(self, key) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.now -= self.size.pop(key)
            del self.refs[key]


def peak_autograd_bytes(fn) -> int:
    """Peak bytes of the tensors that autograd holds for backward while `fn()` runs.

    Every tensor saved for backward is counted while a graph holds it (each storage once) and
    released when the graph frees it; the peak is the activation memory a step needs, measured the
    same way on any device. A double backward keeps the first backward's graph alive, which is
    what makes an exact meta step heavier."""
    live = _LiveStorages()
    with torch.autograd.graph.saved_tensors_hooks(live.track, lambda t: t):
        fn()
    return live.peak


def peak_tensor_bytes(fn) -> int:
    """Peak bytes of the tensors created while `fn()` runs that are alive at the same time (each
    storage once): activations, temporaries, gradients and optimiser state, on any device and also
    inside torch.func transforms (where saved-tensor hooks are refused). Every operator's outputs
    are seen through a TorchDispatchMode; a storage counts from its first output until the last
    tensor seen on it is freed. Tensors that existed before `fn` (data, weights) are not counted."""
    import warnings

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    live = _LiveStorages()

    class TrackOutputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    live.track(t)
            return out

    with warnings.catch_warnings():      # torch.func may warn about its own jit use on first load
        warnings.simplefilter("ignore", FutureWarning)
        with TrackOutputs():
            fn()
    return live.peak


def peak_step_bytes(fn, device: torch.device) -> tuple[int, str]:
    """(peak bytes, what was measured) of running `fn()` on `device`: on CUDA the allocator's peak
    above what was allocated before; elsewhere peak_tensor_bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        return int(torch.cuda.max_memory_allocated(device) - before), "cuda max_memory_allocated above the start"
    return peak_tensor_bytes(fn), "peak bytes of the tensors created (bench.peak_tensor_bytes)"


def step_setup(model_name, width, batch_size, channels_last, dev, seed):
    """(model, SGD optimiser, x, y, x_meta, y_meta): random CIFAR-shaped batches for timing a step."""
    torch.manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(model_name, 10, width).to(dev).to(memory_format=fmt)
    x = torch.randn(batch_size, 3, 32, 32, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(10, (batch_size,), device=dev)
    xm = torch.randn(batch_size, 3, 32, 32, device=dev).contiguous(memory_format=fmt)
    ym = torch.randint(10, (batch_size,), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return model, opt, x, y, xm, ym


def meta_step_cost(model_name: str = "small_cnn", width: int = 32, batch_size: int = 128,
                   channels_last: bool = False, repeats: int = 10, device: str = "cpu",
                   mode: str = "jvp", seed: int = 0) -> dict:
    """Seconds of one plain SGD step and of one Learning-to-Reweight meta step (virtual step,
    meta-gradient, real step) on the same model and batch, and their ratio. `mode` is the
    meta-gradient of `reweighting_step`: exact (double backward), jvp (exact, forward mode) or fd
    (finite difference). The plain step is timed before and after; the faster of the two counts.
    `memory_ratio` is the meta step's peak autograd memory over the plain step's
    (peak_autograd_bytes)."""
    dev = torch.device(device)
    model, opt, x, y, xm, ym = step_setup(model_name, width, batch_size, channels_last, dev, seed)

    def plain():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def meta():
        reweighting_step(model, opt, x, y, xm, ym, lr=0.01, mode=mode)

    plain_s = _median_seconds(plain, repeats)
    meta_s = _median_seconds(meta, repeats)
    plain_s2 = _median_seconds(plain, repeats, warmup=1)        # again, after: guards against drift
    plain_s = min(plain_s, plain_s2)
    mem = {"plain": peak_autograd_bytes(plain), "meta": peak_autograd_bytes(meta)}
    return {"model": model_name, "batch_size": batch_size, "channels_last": channels_last,
            "mode": mode, "device": str(dev), "threads": torch.get_num_threads(),
            "plain_step_s": plain_s, "meta_step_s": meta_s, "ratio": meta_s / plain_s,
            "plain_autograd_bytes": mem["plain"], "meta_autograd_bytes": mem["meta"],
            "memory_ratio": mem["meta"] / mem["plain"]}


def loader_throughput(x_uint8: torch.Tensor, y: torch.Tensor, batch_size: int = 128, batches: int = 100,
                      device: str = "cpu") -> dict:
    """Images per second of the device loader (crop + flip + normalise, batched) against a
    torchvision DataLoader with the same transforms (RandomCrop(32, 4), RandomHorizontalFlip,
    ToTensor, Normalize), num_workers=0, on the same images. x_uint8: (N, 32, 32, 3)."""
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, Dataset

    from .data import CIFAR_MEAN, CIFAR_STD

    loader = DeviceLoader(x_uint8, y, batch_size, train=True, seed=0, device=device)
    n_batches = min(batches, len(loader))

    def ours():
        for i, b in enumerate(loader.epoch(0)):
            if i + 1 >= n_batches:
                break
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    tf = T.Compose([T.ToPILImage(), T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(CIFAR_MEAN, CIFAR_STD)])

    class Images(Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return tf(x_uint8[i].numpy()), int(y[i])

    tv_loader = DataLoader(Images(), batch_size=batch_size, shuffle=True, num_workers=0)

    def torchvision_pipeline():
        for i, (xb, yb) in enumerate(tv_loader):
            xb = xb.to(device)
            if i + 1 >= n_batches:
                break

    t0 = time.perf_counter()
    ours()
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    torchvision_pipeline()
    tv_s = time.perf_counter() - t0
    n = n_batches * batch_size
    return {"images": n, "device": device, "ours_img_per_s": n / ours_s, "torchvision_img_per_s": n / tv_s,
            "speedup": tv_s / ours_s}
