"""Fetching a bundle archive over real HTTP: validated before it is published, and bounded in
what a hostile archive or server can do (links, sizes, member count, time, schemes, names)."""
import functools
import hashlib
import http.server
import io
import shutil
import socket
import tarfile
import tempfile
import threading
import time

import pytest

from index_builder import bundle
from index_builder.fetch import Limits, archive_url, fetch, unpack
from sine_cli.main import main


def _serve(handler):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture
def store(tmp_path):
    """A local HTTP server over a folder, standing in for an object store's endpoint."""
    d = tmp_path / "store"
    d.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(d))
    handler.log_message = lambda *a: None
    srv = _serve(handler)
    yield d, f"http://127.0.0.1:{srv.server_address[1]}/bundles"
    srv.shutdown()


def archive(src, dest, arcname):
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src, arcname=arcname)


def hostile(dest, members):
    """A .tar.gz of hand-made members: (TarInfo fields, data or None)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        for fields, data in members:
            info = tarfile.TarInfo(fields.pop("name"))
            for k, v in fields.items():
                setattr(info, k, v)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def fetch_cli(url, version, root, *extra):
    return main(["fetch-bundle", "--url", url, "--version", version, "--bundle-root", str(root),
                 "--allow-http", *extra])


def left_behind(root):
    return [p.name for p in root.iterdir()] if root.exists() else []


def test_fetch_publishes_a_valid_archive(small_world, store, tmp_path, monkeypatch):
    d, url = store
    archive(small_world["root"] / "v1", d / "bundles" / "v1.tar.gz", "v1")
    # the download lands in the bundle root, never in the temporary folder
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmp"))
    root = tmp_path / "root"
    assert fetch_cli(url, "v1", root) == 0
    assert bundle.current_version(root) == "v1"
    assert bundle.load(root, deep=True).version == "v1"
    assert sorted(left_behind(root)) == ["current", "v1"]
    assert fetch(url, "v1", root).version == "v1"            # already there: re-pointed only


@pytest.mark.parametrize("case, says", [("missing", "download failed"), ("garbage", "tar.gz"),
                                        ("corrupt", "sha256"), ("other", "not 'v2'")])
def test_fetch_refuses_and_leaves_nothing(small_world, store, tmp_path, case, says, capsys):
    d, url = store
    target = d / "bundles" / "v2.tar.gz"
    if case == "garbage":
        target.parent.mkdir(parents=True)
        target.write_bytes(b"\x1f\x8b garbage")
    elif case == "corrupt":
        tmp = tmp_path / "v2"
        shutil.copytree(small_world["root"] / "v1", tmp)
        (tmp / "index.faiss").write_bytes(b"not an index")
        archive(tmp, target, "v2")
    elif case == "other":
        archive(small_world["root"] / "v1", target, "v1")
    root = tmp_path / "root"
    rc = fetch_cli(url, "v2", root)
    assert rc == 2 and says in capsys.readouterr().err
    assert not (root / "v2").exists() and not (root / "current").exists()
    assert root.is_dir() and not list(root.iterdir())         # no staging folder left behind


LINK_CASES = {
    # v2's index pointing at another version's file: survived the old flattening and broke
    # when v1 was deleted
    "relative symlink": [({"name": "v2", "type": tarfile.DIRTYPE}, None),
                         ({"name": "v2/index.faiss", "type": tarfile.SYMTYPE,
                           "linkname": "../v1/index.faiss"}, None)],
    # the shape of the CVE-2025-4517 archives: a link to a folder, then a file written through it
    "link then write through it": [({"name": "v2", "type": tarfile.SYMTYPE,
                                     "linkname": "../.."}, None),
                                   ({"name": "v2/escaped.txt"}, b"outside")],
    "hard link": [({"name": "v2/index.faiss", "type": tarfile.LNKTYPE,
                   "linkname": "/etc/passwd"}, None)],
    "device": [({"name": "v2/dev", "type": tarfile.CHRTYPE}, None)],
    "absolute path": [({"name": "/tmp/escaped.txt"}, b"outside")],
    "parent folder": [({"name": "../escaped.txt"}, b"outside")],
    "deep path": [({"name": "v2/a/b.txt"}, b"deep")],
    # a second member of a name replaced the first with extractall
    "duplicate": [({"name": "v2/index.faiss"}, b"first"), ({"name": "v2/index.faiss"}, b"2nd")],
}


@pytest.mark.parametrize("case", LINK_CASES)
def test_links_and_odd_names_are_refused(store, tmp_path, case, capsys):
    d, url = store
    hostile(d / "bundles" / "v2.tar.gz", [(dict(f), b) for f, b in LINK_CASES[case]])
    root = tmp_path / "deep" / "root"
    assert fetch_cli(url, "v2", root) == 2
    err = capsys.readouterr().err
    assert "regular files" in err or "not a plain file" in err, err    # the reason, named
    assert left_behind(root) == []                       # staging and download both gone
    assert not list(tmp_path.rglob("escaped.txt")) and not (tmp_path / "deep" / "escaped.txt").exists()


def test_size_and_member_limits_hold_before_the_data_is_written(store, tmp_path, capsys):
    d, url = store
    zeros = b"\0" * (4 << 20)                           # 4 MiB that compress to a few KB
    hostile(d / "bundles" / "big.tar.gz", [({"name": "big/a.bin"}, zeros),
                                           ({"name": "big/b.bin"}, zeros)])
    assert (d / "bundles" / "big.tar.gz").stat().st_size < 64 << 10
    root = tmp_path / "root"
    assert fetch_cli(url, "big", root, "--max-file-bytes", str(1 << 20)) == 2
    assert "--max-file-bytes" in capsys.readouterr().err and left_behind(root) == []
    assert fetch_cli(url, "big", root, "--max-unpacked-bytes", str(6 << 20)) == 2
    assert "--max-unpacked-bytes" in capsys.readouterr().err and left_behind(root) == []
    assert fetch_cli(url, "big", root, "--max-archive-bytes", "1000") == 2
    assert "--max-archive-bytes" in capsys.readouterr().err and left_behind(root) == []
    hostile(d / "bundles" / "many.tar.gz", [({"name": f"many/f{i}"}, b"x") for i in range(10)])
    assert fetch_cli(url, "many", root, "--max-members", "5") == 2
    assert "--max-members" in capsys.readouterr().err and left_behind(root) == []


def test_unpack_stops_at_the_total_limit(tmp_path):
    zeros = b"\0" * (1 << 20)
    hostile(tmp_path / "a.tar.gz", [({"name": f"v/f{i}"}, zeros) for i in range(8)])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(bundle.BundleError, match="unpacks to more than"):
        unpack(tmp_path / "a.tar.gz", out, Limits(total_bytes=3 << 20))
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert written <= 3 << 20                            # nothing past the limit hit the disk


def test_sha256_is_checked_before_unpacking(small_world, store, tmp_path, capsys):
    d, url = store
    target = d / "bundles" / "v1.tar.gz"
    archive(small_world["root"] / "v1", target, "v1")
    good = hashlib.sha256(target.read_bytes()).hexdigest()
    root = tmp_path / "root"
    assert fetch_cli(url, "v1", root, "--sha256", "0" * 64) == 2
    assert "not the expected" in capsys.readouterr().err and left_behind(root) == []
    assert fetch_cli(url, "v1", root, "--sha256", "xyz") == 2
    assert "not a hex sha256" in capsys.readouterr().err
    assert fetch_cli(url, "v1", root, "--sha256", good.upper()) == 0
    assert bundle.current_version(root) == "v1"


def test_schemes_and_urls(store, tmp_path, capsys):
    d, url = store
    root = tmp_path / "root"
    rc = main(["fetch-bundle", "--url", url, "--version", "v1", "--bundle-root", str(root)])
    assert rc == 2 and "--allow-http" in capsys.readouterr().err
    (tmp_path / "v1.tar.gz").write_bytes(b"x")
    for bad in (f"file://{tmp_path}", "ftp://example.org/b", str(tmp_path)):
        assert fetch_cli(bad, "v1", root) == 2
        assert "only https://" in capsys.readouterr().err
    signed = "https://store.example/b/{version}.tar.gz?X-Sig={abc}&exp={1}"
    assert archive_url(signed, "v7") == "https://store.example/b/v7.tar.gz?X-Sig={abc}&exp={1}"
    assert archive_url("https://s/b/", "v7") == "https://s/b/v7.tar.gz"


@pytest.mark.parametrize("name", ["a/b", "../x", "..", "", ".hidden", "v1\n"])
def test_version_names_are_checked(store, tmp_path, name, capsys):
    d, url = store
    root = tmp_path / "root"
    (tmp_path / "x").mkdir()
    assert fetch_cli(url, name, root) == 2
    assert "not a version name" in capsys.readouterr().err
    assert not (root / "current").exists()
    with pytest.raises(bundle.BundleError, match="not a version name"):
        bundle.set_current(tmp_path, "../x")            # `current` never leaves the root


def test_a_truncated_download_is_a_clear_error(small_world, tmp_path, capsys):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(small_world["root"] / "v1", arcname="v1")
    cut = buf.getvalue()[: len(buf.getvalue()) // 2]

    class Truncated(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)              # no Content-Length: the cut is not announced
            self.end_headers()
            self.wfile.write(cut)

        def log_message(self, *a):
            pass

    srv = _serve(Truncated)
    try:
        root = tmp_path / "root"
        assert fetch_cli(f"http://127.0.0.1:{srv.server_address[1]}", "v1", root) == 2
        assert "truncated" in capsys.readouterr().err and left_behind(root) == []
    finally:
        srv.shutdown()


def test_a_trickling_server_meets_the_total_deadline(tmp_path, capsys):
    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            try:
                for _ in range(600):             # a byte every 50 ms for 30 s: no read times out
                    self.wfile.write(b"\x1f")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass

        def log_message(self, *a):
            pass

    srv = _serve(Trickle)
    try:
        root = tmp_path / "root"
        t0 = time.monotonic()
        rc = fetch_cli(f"http://127.0.0.1:{srv.server_address[1]}", "v1", root,
                       "--timeout-s", "1")
        took = time.monotonic() - t0
        assert rc == 2 and "longer than 1 s" in capsys.readouterr().err
        assert took < 15, took                  # a total deadline, not one per read
        assert left_behind(root) == []
    finally:
        srv.shutdown()


def test_a_silent_server_meets_the_total_deadline(tmp_path, capsys):
    with socket.socket() as lsn:                 # accepts, then never answers
        lsn.bind(("127.0.0.1", 0))
        lsn.listen()
        t0 = time.monotonic()
        rc = fetch_cli(f"http://127.0.0.1:{lsn.getsockname()[1]}", "v1", tmp_path / "root",
                       "--timeout-s", "1")
        assert rc == 2 and time.monotonic() - t0 < 15
        assert "longer than 1 s" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["gnu", "pax"])
def test_a_huge_long_name_or_pax_header_is_refused_before_it_is_read(tmp_path, kind):
    """The finding: tarfile read such a header's whole payload first; a 2.2 MiB archive took
    the reader to 555 MiB."""
    import tracemalloc

    name = "v1/" + "n" * (64 << 20)                            # 64 MiB, compresses to ~64 KiB
    fmt = tarfile.GNU_FORMAT if kind == "gnu" else tarfile.PAX_FORMAT
    dest = tmp_path / "h.tar.gz"
    with tarfile.open(dest, "w:gz", format=fmt) as tar:
        info = tarfile.TarInfo(name)
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    assert dest.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(bundle.BundleError, match="header of"):
            unpack(dest, tmp_path / "out", Limits())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak                                # not the 64 MiB payload


def test_redirects_are_checked_hop_by_hop(store, tmp_path, capsys):
    import urllib.request

    from index_builder.fetch import _CheckedRedirects

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", "ftp://example.org/v1.tar.gz")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = _serve(Redirect)
    try:
        assert fetch_cli(f"http://127.0.0.1:{srv.server_address[1]}", "v1", tmp_path / "r") == 2
        err = capsys.readouterr().err
        assert "only https://" in err and "ftp" in err
    finally:
        srv.shutdown()
    h = _CheckedRedirects(allow_http=True)                     # even where http is allowed
    req = urllib.request.Request("https://store.example/b/v1.tar.gz?X-Amz-Signature=s3cr3t")
    with pytest.raises(bundle.BundleError, match="may not drop https") as e:
        h.redirect_request(req, None, 302, "Found", {}, "http://mirror.example/v1.tar.gz")
    assert "s3cr3t" not in str(e.value)
    hop = h.redirect_request(req, None, 302, "Found", {}, "https://mirror.example/v1.tar.gz")
    with pytest.raises(bundle.BundleError, match="may not drop https"):  # https earlier in the chain
        h.redirect_request(hop, None, 302, "Found", {}, "http://other.example/v1.tar.gz")
