"""The images, built with podman (deploy/build-images.sh) and run as the chart runs them:
read-only root, every capability dropped, uid 10001, a tmpfs /tmp. The service image serves a
bundle mounted read-only with a real redis-server; the training image trains on synthetic data.

Marked `images`; skipped where podman is not installed, unless SINE_REQUIRE_IMAGES=1 (CI sets
it, so that a missing engine fails instead of skipping). An image the build script skipped for
want of disk (`--if-room`, recorded in build.json) skips its test with the script's reason; any
other missing image fails."""
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from devtools.local import free_port
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
REPO = "localhost/sine-retrieval"
CHART_SECURITY = ["--read-only", "--tmpfs", "/tmp:rw,size=64m", "--cap-drop", "ALL",
                  "--security-opt", "no-new-privileges", "--user", "10001:10001"]
pytestmark = pytest.mark.images


def _version() -> str:
    import tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _env() -> dict[str, str]:
    return {**os.environ,
            "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF",
                                              str(ROOT / "deploy" / "podman" / "containers.conf"))}


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], env=_env(), capture_output=True, text=True,
                          check=check, timeout=timeout)


class Built:
    """The images' tags, and the build script's record of what it built or skipped."""

    def __init__(self, build_dir: Path) -> None:
        self.tag = f"{REPO}:{_version()}"
        self.build_json = build_dir / "build.json"

    def image(self, suffix: str = "") -> str:
        """The image `<tag><suffix>`, once it is known to exist; a test skips on a recorded skip."""
        image = self.tag + suffix
        if podman("image", "exists", image, check=False).returncode == 0:
            return image
        records = json.loads(self.build_json.read_text()) if self.build_json.exists() else []
        why = {r["image"]: r["skipped"] for r in records if "skipped" in r}
        if image in why:
            pytest.skip(f"not built: {why[image]}")
        pytest.fail(f"{image} does not exist and {self.build_json} records no skip for it")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    """Builds the images unless SINE_IMAGES_BUILT=1 says .ci/run already has (and timed it)."""
    if shutil.which("podman") is None:
        if os.environ.get("SINE_REQUIRE_IMAGES") == "1":
            pytest.fail("podman is not installed and SINE_REQUIRE_IMAGES=1")
        pytest.skip("podman is not installed")
    if os.environ.get("SINE_IMAGES_BUILT") == "1":
        return Built(Path(os.environ.get("SINE_BUILD_DIR", ROOT / "build" / "images")))
    out = tmp_path_factory.mktemp("images")
    subprocess.run(["bash", str(ROOT / "deploy" / "build-images.sh"), "--if-room", "all"],
                   check=True, env={**_env(), "SINE_BUILD_DIR": str(out)}, timeout=1200)
    return Built(out)


def readable_copy(src: Path, dst: Path) -> Path:
    """A copy the container's uid 10001 can read (pytest's temporary folders are 0700)."""
    shutil.copytree(src, dst, symlinks=True)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    dst.parent.chmod(0o755)
    return dst


def test_the_service_image_serves_a_personalized_answer(built, small_world, redis_server,
                                                       tmp_path):
    bundles = readable_copy(small_world["root"], tmp_path / "share" / "bundles")
    ds = small_world["ds"]
    user, clicks = "container-user", [str(i) for i in ds.item_ids[1:6]]
    r = redis_server.client()
    r.delete(f"sine:history:{user}")
    r.lpush(f"sine:history:{user}", *clicks)        # newest first: the last pushed
    port = free_port()                               # not the image's default 8000
    name = f"sine-test-{port}"
    podman("run", "-d", "--name", name, "--network", "host", *CHART_SECURITY,
           "-v", f"{bundles}:/bundles:ro", "-e", f"SINE_PORT={port}", "-e", "SINE_HOST=127.0.0.1",
           "-e", f"SINE_REDIS_URL=redis://127.0.0.1:{redis_server.port}/0",
           built.image())
    try:
        base = f"http://127.0.0.1:{port}"

        def ready():
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            assert state == "running", podman("logs", name, check=False).stderr[-3000:]
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False
        wait_until(ready, timeout_s=90, what="/readyz in the container", every_s=0.25)
        got = httpx.post(f"{base}/recommend", json={"user_id": user, "n": 5}, timeout=5)
        assert got.status_code == 200, got.text
        body = got.json()
        assert body["fallback"] is None and body["score_kind"] == "inner_product"
        assert len(body["items"]) == 5
        assert not {i["item_id"] for i in body["items"]} & set(clicks)   # history excluded
        cold = httpx.post(f"{base}/recommend", json={"user_id": "nobody", "n": 3}, timeout=5)
        assert cold.json()["fallback"] == "cold_start"
        metrics = httpx.get(f"{base}/metrics", timeout=5)
        assert metrics.status_code == 200 and "sine_request_duration_seconds" in metrics.text
        # the image's HEALTHCHECK follows SINE_PORT (a fixed port would fail here)
        health = podman("healthcheck", "run", name, check=False)
        assert health.returncode == 0, health.stdout + health.stderr
        # the root file system is read-only and the process is not root
        probe = podman("exec", name, "sh", "-c", "id -u; touch /opt/x 2>&1 || echo refused",
                       check=False)
        assert probe.stdout.split()[0] == "10001" and "refused" in probe.stdout
    finally:
        podman("rm", "-f", "-t", "2", name, check=False)


def test_an_unhealthy_port_fails_the_healthcheck(built, tmp_path):
    """The same HEALTHCHECK, with nothing listening on SINE_PORT: it must fail, not pass."""
    port = free_port()
    name = f"sine-test-idle-{port}"
    podman("run", "-d", "--name", name, "--network", "host", *CHART_SECURITY,
           "-e", f"SINE_PORT={port}", "--entrypoint", "sleep", built.image(), "60")
    try:
        assert podman("healthcheck", "run", name, check=False).returncode != 0
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)


def test_the_training_image_trains_a_few_steps(built, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    t0 = time.monotonic()
    run = podman("run", "--rm", *CHART_SECURITY, "-v", f"{out}:/out",
                 built.image("-train"), "train", "--dataset", "synthetic", "--epochs", "1",
                 "--D", "16", "--K", "2", "--L", "8", "--batch-size", "256", "--no-progress",
                 "--out", "/out/run", check=False, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert metrics and time.monotonic() - t0 < 300
    assert (out / "run" / "best.pt").exists()


@pytest.mark.parametrize("if_room", [False, True], ids=["refused", "skipped"])
def test_an_image_without_room_is_not_built(built, tmp_path, if_room):
    """The disk check runs before the build: asked for more room than any disk has, the script
    refuses (exit 4), or with --if-room records the skip and why, and the existing image stays."""
    image = built.image("-train")
    before = podman("image", "inspect", "--format", "{{.Id}}", image).stdout
    args = ["--if-room", "train"] if if_room else ["train"]
    run = subprocess.run(["bash", str(ROOT / "deploy" / "build-images.sh"), *args],
                         env={**_env(), "SINE_BUILD_DIR": str(tmp_path),
                              "SINE_NEED_MB_TRAIN": str(2**40)},
                         capture_output=True, text=True, timeout=300)
    assert "needs about" in run.stderr and "MB free in" in run.stderr, run.stderr
    if if_room:
        assert run.returncode == 0, run.stderr
        [record] = json.loads((tmp_path / "build.json").read_text())
        assert record["image"] == image and "needs about" in record["skipped"]
    else:
        assert run.returncode == 4, run.stderr
        assert not (tmp_path / "build.json").exists()
    assert podman("image", "inspect", "--format", "{{.Id}}", image).stdout == before


def test_a_missing_image_skips_only_where_the_build_recorded_why(built, tmp_path):
    """`Built.image`: a skip recorded in build.json skips with its reason; a missing image the
    record does not explain fails (CI must not pass by skipping what it failed to build)."""
    record = Built(tmp_path)
    missing = record.tag + "-never-built"
    (tmp_path / "build.json").write_text(json.dumps(
        [{"image": missing, "dockerfile": "x", "skipped": "needs about 9 MB free"}]))
    with pytest.raises(pytest.skip.Exception, match="not built: needs about 9 MB free"):
        record.image("-never-built")
    with pytest.raises(pytest.fail.Exception, match="records no skip"):
        record.image("-also-never-built")
    assert record.image() == record.tag
