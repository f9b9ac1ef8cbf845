"""Tests for metabook.download, fully offline.

Tiny archives in the exact official CIFAR format (pickled dicts with bytes keys, same member
names) are built in a temp dir and served by a local ThreadingHTTPServer on 127.0.0.1. Their md5
differs from the official one, so the tests pass `md5=` explicitly.
"""

import hashlib
import http.server
import io
import pickle
import tarfile
import threading
import time

import numpy as np
import pytest

from metabook import download as dl

STALL_S = 10  # how long the "stall" route keeps a client waiting (released early at teardown)


# ----------------------------------------------------------------------------- fake archives

def _pixels(rng, n):
    """(n, 3072) uint8 rows, plus one planted pixel: image 0, row 1, col 2 = RGB (200, 100, 50)."""
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    for c, v in enumerate((200, 100, 50)):
        data[0, c * 1024 + 1 * 32 + 2] = v
    return data


def _nhwc_reference(data):
    """NHWC via explicit indexing (independent of the reshape/transpose under test)."""
    n = len(data)
    out = np.empty((n, 32, 32, 3), np.uint8)
    for i in range(n):
        for c in range(3):
            for h in range(32):
                out[i, h, :, c] = data[i, c * 1024 + h * 32: c * 1024 + h * 32 + 32]
    return out


def _tar_gz(members):
    """tar.gz bytes holding {name: python object pickled with protocol 2, like the originals}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, obj in members.items():
            payload = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _fake_cifar10(rng):
    root = "cifar-10-batches-py/"
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
             b"dog", b"frog", b"horse", b"ship", b"truck"]
    members, xs, ys = {root + "readme.html": b"<html></html>"}, [], []
    for i in range(1, 6):
        data, labels = _pixels(rng, 2), [int(v) for v in rng.integers(0, 10, 2)]
        members[root + f"data_batch_{i}"] = {
            b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels,
            b"data": data, b"filenames": [b"a.png", b"b.png"]}
        xs.append(data)
        ys += labels
    test = _pixels(rng, 3)
    test_labels = [9, 0, 4]
    members[root + "test_batch"] = {b"batch_label": b"testing batch 1 of 1", b"labels": test_labels,
                                    b"data": test, b"filenames": [b"c.png"] * 3}
    members[root + "batches.meta"] = {b"num_cases_per_batch": 10000, b"label_names": names,
                                      b"num_vis": 3072}
    blob = _tar_gz(members)
    expected = dict(x_train=_nhwc_reference(np.concatenate(xs)), y_train=np.array(ys, np.uint8),
                    x_test=_nhwc_reference(test), y_test=np.array(test_labels, np.uint8),
                    class_names=[n.decode() for n in names])
    return blob, expected


def _fake_cifar100(rng):
    root = "cifar-100-python/"
    fine = [f"fine{i}".encode() for i in range(100)]
    coarse = [f"coarse{i}".encode() for i in range(20)]
    train, test = _pixels(rng, 3), _pixels(rng, 2)
    split = {
        "train": (train, [99, 0, 42], [19, 0, 7]),
        "test": (test, [5, 77], [3, 11]),
    }
    members = {}
    for part, (data, f, c) in split.items():
        members[root + part] = {b"filenames": [b"x.png"] * len(data), b"batch_label": b"x",
                                b"fine_labels": f, b"coarse_labels": c, b"data": data}
    members[root + "meta"] = {b"fine_label_names": fine, b"coarse_label_names": coarse}
    blob = _tar_gz(members)
    expected = dict(x_train=_nhwc_reference(train), y_train=np.array([99, 0, 42], np.uint8),
                    y_train_coarse=np.array([19, 0, 7], np.uint8),
                    x_test=_nhwc_reference(test), y_test=np.array([5, 77], np.uint8),
                    y_test_coarse=np.array([3, 11], np.uint8),
                    class_names=[n.decode() for n in fine],
                    coarse_class_names=[n.decode() for n in coarse])
    return blob, expected


@pytest.fixture(scope="module")
def archives():
    """{name: (archive bytes, md5, expected arrays)} for tiny official-format archives."""
    rng = np.random.default_rng(0)
    out = {}
    for name, make in (("cifar10", _fake_cifar10), ("cifar100", _fake_cifar100)):
        blob, expected = make(rng)
        out[name] = (blob, hashlib.md5(blob).hexdigest(), expected)
    return out


# ----------------------------------------------------------------------------- local HTTP server

class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        srv = self.server
        srv.requests.append(self.path)
        route = srv.routes.get(self.path)
        if route is None:
            self.send_error(404)
        elif route == "stall":
            srv.release.wait(STALL_S)  # send nothing: the client must give up on its own
        elif isinstance(route, tuple) and route[0] == "trickle":
            _, piece, interval = route          # `piece` every `interval` s, for ever
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            while not srv.release.is_set():
                try:
                    self.wfile.write(piece)
                    self.wfile.flush()
                except OSError:                 # the client gave up
                    return
                srv.release.wait(interval)
        elif isinstance(route, tuple) and route[0] == "redirect":
            self.send_response(302)
            self.send_header("Location", route[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(200)
            self.send_header("Content-Type", "application/gzip")
            self.send_header("Content-Length", str(len(route)))
            self.end_headers()
            self.wfile.write(route)

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that gave up (stall test) makes the handler hit a closed socket


@pytest.fixture
def server():
    """Local server. Set `server.routes[path] = bytes | "stall" | ("redirect", url) |
    ("trickle", bytes, seconds)`; 404 otherwise."""
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.routes, srv.requests, srv.release = {}, [], threading.Event()
    srv.base = lambda prefix: f"http://127.0.0.1:{srv.server_address[1]}/{prefix}/"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("METABOOK_CIFAR_MIRRORS", "METABOOK_DATA", "METABOOK_CACHE"):
        monkeypatch.delenv(var, raising=False)


def _serve(server, prefix, name, body):
    server.routes[f"/{prefix}/{dl.ARCHIVES[name]['filename']}"] = body
    return server.base(prefix)


def _no_temp_files(directory):
    return not list(directory.glob("*.part"))


# ----------------------------------------------------------------------------- tests

def test_download_and_convert_cifar10_gives_nhwc_uint8_arrays(server, archives, tmp_path):
    blob, md5, exp = archives["cifar10"]
    good = _serve(server, "good", "cifar10", blob)
    path = dl.fetch_npz("cifar10", tmp_path, mirrors=[good], md5=md5, progress=True)
    assert path == tmp_path / "cifar10.npz"
    with np.load(path) as d:
        assert d["x_train"].shape == (10, 32, 32, 3) and d["x_train"].dtype == np.uint8
        assert d["x_test"].shape == (3, 32, 32, 3) and d["x_test"].dtype == np.uint8
        assert d["y_train"].dtype == np.uint8 and d["y_test"].dtype == np.uint8
        # planted pixel (row 1, col 2) = RGB (200, 100, 50): fails under any wrong transpose
        assert d["x_train"][0, 1, 2].tolist() == [200, 100, 50]
        assert d["x_test"][0, 1, 2].tolist() == [200, 100, 50]
        np.testing.assert_array_equal(d["x_train"], exp["x_train"])
        np.testing.assert_array_equal(d["x_test"], exp["x_test"])
        np.testing.assert_array_equal(d["y_train"], exp["y_train"])
        np.testing.assert_array_equal(d["y_test"], exp["y_test"])
        assert d["class_names"].tolist() == exp["class_names"]
    assert (tmp_path / "cifar-10-python.tar.gz").is_file()
    assert _no_temp_files(tmp_path)


def test_cifar100_npz_has_fine_and_coarse_labels(server, archives, tmp_path):
    blob, md5, exp = archives["cifar100"]
    good = _serve(server, "good", "cifar100", blob)
    path = dl.fetch_npz("cifar100", tmp_path, mirrors=[good], md5=md5, progress=False)
    assert path.name == "cifar100.npz"
    with np.load(path) as d:
        for key in ("x_train", "x_test", "y_train", "y_test", "y_train_coarse", "y_test_coarse"):
            np.testing.assert_array_equal(d[key], exp[key])
            assert d[key].dtype == np.uint8
        assert d["x_train"][0, 1, 2].tolist() == [200, 100, 50]
        assert d["class_names"].tolist() == exp["class_names"]
        assert d["coarse_class_names"].tolist() == exp["coarse_class_names"]


def test_npz_loads_without_allow_pickle(server, archives, tmp_path):
    for name in ("cifar10", "cifar100"):
        blob, md5, _ = archives[name]
        good = _serve(server, "good", name, blob)
        path = dl.fetch_npz(name, tmp_path, mirrors=[good], md5=md5, progress=False)
        with np.load(path, allow_pickle=False) as d:
            for key in d.files:
                assert d[key].dtype != object  # reading an object array would raise here


def test_falls_back_after_404_and_unreachable_port(server, archives, tmp_path, dead_mirror):
    blob, md5, _ = archives["cifar10"]
    good = _serve(server, "good", "cifar10", blob)
    missing = server.base("missing")  # 404
    path = dl.download_archive("cifar10", tmp_path, mirrors=[dead_mirror, missing, good],
                               md5=md5, progress=False)
    assert path.read_bytes() == blob
    assert server.requests == ["/missing/cifar-10-python.tar.gz", "/good/cifar-10-python.tar.gz"]


def test_md5_mismatch_is_rejected_and_next_mirror_used(server, archives, tmp_path):
    blob, md5, _ = archives["cifar10"]
    bad = _serve(server, "bad", "cifar10", blob[:-1] + bytes([blob[-1] ^ 1]))
    good = _serve(server, "good", "cifar10", blob)
    path = dl.download_archive("cifar10", tmp_path, mirrors=[bad, good], md5=md5, progress=False)
    assert path.read_bytes() == blob
    assert server.requests == ["/bad/cifar-10-python.tar.gz", "/good/cifar-10-python.tar.gz"]
    assert _no_temp_files(tmp_path)


def test_all_mirrors_failing_raises_download_error_naming_every_url(server, archives, tmp_path,
                                                                    dead_mirror):
    blob, md5, _ = archives["cifar10"]
    bad = _serve(server, "bad", "cifar10", b"not the archive")
    missing = server.base("missing")
    with pytest.raises(dl.DownloadError) as info:
        dl.download_archive("cifar10", tmp_path, mirrors=[dead_mirror, missing, bad],
                            md5=md5, progress=False)
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    for base in (dead_mirror, missing, bad):
        assert base + "cifar-10-python.tar.gz" in msg
    assert "404" in msg and "md5 mismatch" in msg
    assert "METABOOK_DATA" in msg and "cifar10.npz" in msg
    assert "\n" not in msg                                  # one line: the command line prints it
    assert not (tmp_path / "cifar-10-python.tar.gz").exists()
    assert _no_temp_files(tmp_path)


def test_stalled_mirror_is_abandoned_within_timeout(server, archives, tmp_path):
    blob, md5, _ = archives["cifar10"]
    stall = _serve(server, "stall", "cifar10", "stall")
    good = _serve(server, "good", "cifar10", blob)
    t0 = time.monotonic()
    path = dl.download_archive("cifar10", tmp_path, mirrors=[stall, good], timeout=0.5,
                               md5=md5, progress=False)
    elapsed = time.monotonic() - t0
    assert path.read_bytes() == blob
    assert elapsed < 3, f"stalled mirror held us {elapsed:.1f}s with timeout=0.5s (stall {STALL_S}s)"


def test_stalled_only_mirror_reports_timeout(server, archives, tmp_path):
    _, md5, _ = archives["cifar10"]
    stall = _serve(server, "stall", "cifar10", "stall")
    with pytest.raises(dl.DownloadError, match="timed out"):
        dl.download_archive("cifar10", tmp_path, mirrors=[stall], timeout=0.3, md5=md5,
                            progress=False)


def test_a_trickling_mirror_is_abandoned_below_the_minimum_rate(server, archives, tmp_path):
    """One byte every 0.05 s never stalls a read past `timeout`: only a rate limit ends it."""
    blob, md5, _ = archives["cifar10"]
    trickle = _serve(server, "trickle", "cifar10", ("trickle", b"x", 0.05))
    good = _serve(server, "good", "cifar10", blob)
    t0 = time.monotonic()
    path = dl.download_archive("cifar10", tmp_path, mirrors=[trickle, good], timeout=2, md5=md5,
                               progress=False, min_rate=1000, rate_window=0.5)
    assert path.read_bytes() == blob and time.monotonic() - t0 < 3
    assert _no_temp_files(tmp_path)


def test_a_mirror_that_never_finishes_is_abandoned_at_its_deadline(server, archives, tmp_path):
    _, md5, _ = archives["cifar10"]
    slow = _serve(server, "slow", "cifar10", ("trickle", b"x" * 4096, 0.01))   # ~400 kB/s, 1 GB
    t0 = time.monotonic()
    with pytest.raises(dl.DownloadError) as info:
        dl.download_archive("cifar10", tmp_path, mirrors=[slow], timeout=2, md5=md5, progress=False,
                            min_rate=1000, rate_window=0.2, deadline=1)
    assert time.monotonic() - t0 < 3
    assert "not finished after 1 s" in str(info.value) and "\n" not in str(info.value)
    assert _no_temp_files(tmp_path)


def test_parts_left_by_a_killed_download_are_deleted_at_the_next_start(server, archives, tmp_path):
    import os
    blob, md5, _ = archives["cifar10"]
    good = _serve(server, "good", "cifar10", blob)
    old = time.time() - 60
    stale = [tmp_path / "cifar-10-python.tar.gz.abc123.part", tmp_path / "cifar10.npz.def456.part"]
    for part in stale:
        part.write_bytes(b"half a download")
        os.utime(part, (old, old))
    other = tmp_path / "notes.part"
    other.write_bytes(b"not ours")
    os.utime(other, (old, old))
    dl.fetch_npz("cifar10", tmp_path, mirrors=[good], md5=md5, progress=False)
    assert not any(p.exists() for p in stale) and other.exists()


def test_a_part_that_a_live_download_is_writing_is_kept(tmp_path):
    import os
    fd, tmp = dl._temp_part(tmp_path / "cifar-10-python.tar.gz")      # locked, like a live download
    try:
        os.utime(tmp, (time.time() - 60,) * 2)
        if dl.fcntl is not None:
            assert dl.remove_stale_parts(tmp_path, "cifar-10-python.tar.gz") == []
            assert os.path.exists(tmp)
    finally:
        os.close(fd)
    assert dl.remove_stale_parts(tmp_path, "cifar-10-python.tar.gz") == [tmp_path / os.path.basename(tmp)]


def test_an_unwritable_cache_folder_is_one_clear_error(tmp_path):
    cache = tmp_path / "cache"
    cache.write_text("a file where the cache folder should be")
    with pytest.raises(dl.DownloadError) as info:
        dl.fetch_npz("cifar10", cache, mirrors=["http://127.0.0.1:9/"], progress=False)
    message = str(info.value)
    assert f"cannot write the download to the cache folder {cache}" in message
    assert "METABOOK_CACHE" in message and "\n" not in message


def test_existing_valid_archive_is_not_downloaded_again(server, archives, tmp_path):
    blob, md5, _ = archives["cifar10"]
    good = _serve(server, "good", "cifar10", blob)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(blob)
    path = dl.download_archive("cifar10", tmp_path, mirrors=[good], md5=md5, progress=False)
    assert path.read_bytes() == blob
    assert server.requests == []


def test_existing_corrupt_archive_is_replaced(server, archives, tmp_path):
    blob, md5, _ = archives["cifar10"]
    good = _serve(server, "good", "cifar10", blob)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"truncated")
    path = dl.download_archive("cifar10", tmp_path, mirrors=[good], md5=md5, progress=False)
    assert path.read_bytes() == blob
    assert server.requests == ["/good/cifar-10-python.tar.gz"]


def test_existing_npz_is_reused_without_network(server, archives, tmp_path):
    blob, md5, _ = archives["cifar10"]
    good = _serve(server, "good", "cifar10", blob)
    first = dl.fetch_npz("cifar10", tmp_path, mirrors=[good], md5=md5, progress=False)
    server.requests.clear()
    assert dl.fetch_npz("cifar10", tmp_path, mirrors=[good], md5=md5, progress=False) == first
    assert server.requests == []


def test_env_var_mirrors_override_defaults(server, archives, tmp_path, monkeypatch, dead_mirror):
    blob, md5, _ = archives["cifar10"]
    good = _serve(server, "good", "cifar10", blob)
    monkeypatch.setenv("METABOOK_CIFAR_MIRRORS", f"{dead_mirror}, {good}")
    path = dl.download_archive("cifar10", tmp_path, md5=md5, progress=False)  # no mirrors=
    assert path.read_bytes() == blob
    assert server.requests == ["/good/cifar-10-python.tar.gz"]


def test_mirrors_argument_takes_precedence_over_env_var(server, archives, tmp_path, monkeypatch,
                                                        dead_mirror):
    blob, md5, _ = archives["cifar10"]
    good = _serve(server, "good", "cifar10", blob)
    monkeypatch.setenv("METABOOK_CIFAR_MIRRORS", dead_mirror)
    path = dl.download_archive("cifar10", tmp_path, mirrors=[good], md5=md5, progress=False)
    assert path.read_bytes() == blob


def test_redirect_is_followed(server, archives, tmp_path):
    blob, md5, _ = archives["cifar10"]
    good = _serve(server, "good", "cifar10", blob)
    moved = _serve(server, "moved", "cifar10", ("redirect", good + "cifar-10-python.tar.gz"))
    path = dl.download_archive("cifar10", tmp_path, mirrors=[moved], md5=md5, progress=False)
    assert path.read_bytes() == blob


def test_metabook_data_dir_short_circuits_fetch(server, tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    np.savez(data_dir / "cifar10.npz", x_train=np.zeros((1, 32, 32, 3), np.uint8))
    monkeypatch.setenv("METABOOK_DATA", str(data_dir))
    path = dl.fetch_npz("cifar10", tmp_path / "cache", mirrors=[server.base("x")], progress=False)
    assert path == data_dir / "cifar10.npz"
    assert server.requests == []


def test_default_mirror_lists_end_with_official_host():
    for name, md5 in (("cifar10", "c58f30108f718f92721af3b95e74349a"),
                      ("cifar100", "eb9058c3a382ffc7106e4002c42a8d85")):
        spec = dl.ARCHIVES[name]
        assert spec["md5"] == md5
        assert spec["mirrors"][-1] == "https://www.cs.toronto.edu/~kriz/"
        assert all(m.startswith("https://") for m in spec["mirrors"])


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("METABOOK_CACHE", str(tmp_path))
    assert dl.default_cache_dir() == tmp_path
    monkeypatch.delenv("METABOOK_CACHE")
    assert dl.default_cache_dir().parts[-2:] == (".cache", "metabook")


def test_unknown_dataset_name_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="cifar10"):
        dl.download_archive("mnist", tmp_path, mirrors=["http://127.0.0.1:1/"], progress=False)
