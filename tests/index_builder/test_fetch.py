"""Fetching a bundle archive over real HTTP: validated before it is published."""
import functools
import http.server
import io
import shutil
import tarfile
import threading

import pytest

from index_builder import bundle
from index_builder.bundle import fetch
from sine_cli.main import main


@pytest.fixture
def store(tmp_path):
    """A local HTTP server over a folder, standing in for an object store's HTTPS endpoint."""
    d = tmp_path / "store"
    d.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(d))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield d, f"http://127.0.0.1:{srv.server_address[1]}/bundles"
    srv.shutdown()


def archive(src, dest, arcname, corrupt=False):
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src, arcname=arcname)
        if corrupt:
            data = b"not an index"
            info = tarfile.TarInfo(f"{arcname}/index.faiss")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_fetch_publishes_a_valid_archive(small_world, store, tmp_path, capsys):
    d, url = store
    archive(small_world["root"] / "v1", d / "bundles" / "v1.tar.gz", "v1")
    root = tmp_path / "root"
    assert main(["fetch-bundle", "--url", url, "--version", "v1", "--bundle-root", str(root)]) == 0
    assert bundle.current_version(root) == "v1"
    assert bundle.load(root, deep=True).version == "v1"
    assert not [p for p in root.iterdir() if p.name.startswith(".staging")]
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
        archive(tmp, target, "v2", corrupt=True)
    elif case == "other":
        archive(small_world["root"] / "v1", target, "v1")
    root = tmp_path / "root"
    rc = main(["fetch-bundle", "--url", url, "--version", "v2", "--bundle-root", str(root)])
    assert rc == 2 and says in capsys.readouterr().err
    assert not (root / "v2").exists() and not (root / "current").exists()
    assert root.is_dir() and not list(root.iterdir())         # no staging folder left behind
