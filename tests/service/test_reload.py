"""Start-up with a broken bundle, hot reload (admin and `current` watching), and providers."""
import concurrent.futures as cf
import json
import shutil
import threading

import pytest

from index_builder import bundle as bundle_mod
from service.settings import Settings
from tests.helpers import metric, wait_until


@pytest.fixture
def root(small_world, tmp_path):
    """A private bundle root holding v1 and v2 (same model, other version names), current = v1."""
    r = tmp_path / "bundles"
    shutil.copytree(small_world["root"] / "v1", r / "v1")
    shutil.copytree(r / "v1", r / "v2")
    m = json.loads((r / "v2" / "manifest.json").read_text())
    m["version"] = "v2"
    (r / "v2" / "manifest.json").write_text(json.dumps(m))
    bundle_mod.set_current(r, "v1")
    return r


def broken(root, name: str, how: str):
    shutil.copytree(root / "v1", root / name)
    m = json.loads((root / name / "manifest.json").read_text())
    m["version"] = name
    if how == "corrupt":
        with open(root / name / "index.faiss", "r+b") as f:
            f.seek(100)
            f.write(b"\x00garbage\x00")
    elif how == "missing":
        (root / name / "popularity.npy").unlink()
    elif how == "schema":
        m["schema_version"] = 99
    elif how == "dims":
        m["model"]["D"] = m["model"]["D"] + 1
    elif how == "unparsable":        # an encoder ONNX Runtime cannot read, its hash consistent
        (root / name / "encoder.onnx").write_bytes(b"\x08\x07 not a protobuf")
        m["files"]["encoder.onnx"] = bundle_mod.sha256_file(root / name / "encoder.onnx")
    elif how == "no-D":              # a manifest lacking a field the loader reads
        del m["model"]["D"]
    (root / name / "manifest.json").write_text(json.dumps(m))


def auth(token="s3cret"):
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("how, says", [("corrupt", "sha256"), ("missing", "popularity.npy"),
                                       ("schema", "schema version"), ("dims", "dimension")])
def test_broken_bundle_at_start_is_not_ready_with_the_reason(root, serve, how, says):
    broken(root, "bad", how)
    with serve(Settings(bundle=str(root / "bad"), watch_interval_s=0), ready=False) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and says in r.json()["detail"]
        assert c.get("/livez").status_code == 200
        r = c.post("/recommend", json={"user_id": "u", "n": 3})
        assert r.status_code == 503 and says in r.json()["detail"]


def test_admin_reload_swaps_and_refuses_broken(root, serve):
    broken(root, "v3", "corrupt")
    with serve(Settings(bundle=str(root), watch_interval_s=0, admin_token="s3cret")) as c:
        assert c.post("/admin/reload", json={"version": "v2"}).status_code == 401
        assert c.post("/admin/reload", json={"version": "v2"},
                      headers=auth("wrong")).status_code == 401
        r = c.post("/admin/reload", json={"version": "v2"}, headers=auth())
        assert r.status_code == 200 and r.json() == {"previous": "v1", "version": "v2"}
        assert c.post("/recommend", json={"user_id": "u", "n": 3}).json()["version"] == "v2"
        r = c.post("/admin/reload", json={"version": "v3"}, headers=auth())
        assert r.status_code == 409 and "sha256" in r.json()["detail"]
        assert "unchanged (v2)" in r.json()["detail"]
        assert c.post("/recommend", json={"user_id": "u", "n": 3}).json()["version"] == "v2"
        r = c.post("/admin/reload", json={"version": "../v1"}, headers=auth())
        assert r.status_code == 422
        r = c.post("/admin/reload", headers=auth())          # no body: whatever current names
        assert r.json()["version"] == "v1"
        assert metric(c, "sine_reloads_total", outcome="refused") == 1
        assert metric(c, "sine_reloads_total", outcome="ok") == 2
        assert metric(c, "sine_bundle_info", factory="Flat", items="300", version="v1") == 1
        assert metric(c, "sine_bundle_info", factory="Flat", items="300", version="v2") == 0


def test_reload_disabled_without_token(root, serve):
    """Disabled answers as a wrong token does: an unauthenticated caller learns nothing."""
    with serve(Settings(bundle=str(root), watch_interval_s=0)) as c:
        r = c.post("/admin/reload", json={}, headers=auth())
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "SINE_ADMIN_TOKEN" not in r.json()["detail"]
    with serve(Settings(bundle=str(root), watch_interval_s=0, admin_token="s3cret")) as c:
        wrong = c.post("/admin/reload", json={}, headers=auth("wrong")).json()
        # the same answer, but for each request's own id
        assert {**r.json(), "request_id": None} == {**wrong, "request_id": None}


def test_the_token_is_checked_before_the_body(root, serve):
    with serve(Settings(bundle=str(root), watch_interval_s=0, admin_token="s3cret")) as c:
        for body in ({"version": 7, "extra": 1}, "{not json"):
            kw = {"json": body} if isinstance(body, dict) else {"content": body}
            r = c.post("/admin/reload", headers={"content-type": "application/json"}, **kw)
            assert r.status_code == 401, r.text                 # not 422 or 400
        r = c.post("/admin/reload", json={"version": 7}, headers=auth())
        assert r.status_code == 422                              # the body, once authenticated


def test_reload_under_concurrent_requests_fails_none(root, serve):
    with serve(Settings(bundle=str(root), watch_interval_s=0, admin_token="s3cret")) as c:
        stop = threading.Event()
        answered: list[tuple[int, str | None]] = []

        def hammer():
            while not stop.is_set():
                r = c.post("/recommend", json={"user_id": "u", "n": 10})
                answered.append((r.status_code, r.json().get("version")))

        with cf.ThreadPoolExecutor(6) as ex:
            futs = [ex.submit(hammer) for _ in range(6)]
            for v in ("v2", "v1", "v2"):
                assert c.post("/admin/reload", json={"version": v}, headers=auth()).status_code == 200
                mark = len(answered)            # requests keep flowing on the new version
                wait_until(lambda: sum(1 for _, got in answered[mark:] if got == v) >= 10,
                           what=f"10 answers from {v}")
            stop.set()
            for f in futs:
                f.result()
        assert answered and {s for s, _ in answered} == {200}
        assert {v for _, v in answered} == {"v1", "v2"}


def test_watching_current_reloads_and_skips_a_broken_version(root, serve):
    broken(root, "v3", "missing")
    with serve(Settings(bundle=str(root), watch_interval_s=0.1)) as c:
        bundle_mod.set_current(root, "v3")
        wait_until(lambda: metric(c, "sine_reloads_total", outcome="refused") >= 1,
                   what="the watcher refusing v3")
        assert c.post("/recommend", json={"user_id": "u", "n": 3}).json()["version"] == "v1"
        bundle_mod.set_current(root, "v2")
        wait_until(lambda: c.post("/recommend", json={"user_id": "u", "n": 3}).json()["version"]
                   == "v2", what="the watcher serving v2")
        assert metric(c, "sine_reloads_total", outcome="ok") == 1


def test_cuda_asked_without_a_gpu_fails_readiness_or_falls_back(root, serve):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine's onnxruntime has CUDA")
    with serve(Settings(bundle=str(root), watch_interval_s=0, providers="cuda"), ready=False) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "providers=cuda" in r.json()["detail"]
        assert "SINE_ALLOW_CPU_FALLBACK" in r.json()["detail"]
    with serve(Settings(bundle=str(root), watch_interval_s=0, providers="cuda",
                        allow_cpu_fallback=True)) as c:
        assert c.get("/readyz").json()["providers"] == ["CPUExecutionProvider"]


def test_wrong_search_param_is_a_clear_error(root, serve):
    with serve(Settings(bundle=str(root), watch_interval_s=0, search_params={"nprobe": 8}),
               ready=False) as c:
        assert "do not apply" in c.get("/readyz").json()["detail"]


@pytest.mark.gpu
def test_gpu_paths(root, serve):
    import faiss
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers() or \
            not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        pytest.skip("needs onnxruntime-gpu and faiss-gpu on a GPU")
    with serve(Settings(bundle=str(root), watch_interval_s=0, providers="cuda",
                        faiss_gpu="on")) as c:
        ready = c.get("/readyz").json()
        assert ready["providers"][0] == "CUDAExecutionProvider" and ready["faiss"] == "gpu"
        assert len(c.post("/recommend", json={"user_id": "u", "n": 10}).json()["items"]) == 10


@pytest.mark.parametrize("how, says", [("unparsable", "cannot be served"),
                                       ("no-D", "model.D")])
def test_any_load_failure_is_a_refused_bundle_and_the_watcher_goes_on(root, serve, how, says):
    """The finding: an encoder ORT cannot parse, or a manifest without model.D, gave
    /admin/reload a 500, and with `current` pointed at it the watcher died unseen, so a good
    version published afterwards was never loaded."""
    broken(root, "v3", how)
    s = Settings(bundle=str(root), watch_interval_s=0.1, admin_token="s3cret")
    with serve(s) as c:
        r = c.post("/admin/reload", json={"version": "v3"}, headers=auth())
        assert r.status_code == 409 and says in r.json()["detail"], r.text
        assert "unchanged (v1)" in r.json()["detail"]
        bundle_mod.set_current(root, "v3")
        wait_until(lambda: metric(c, "sine_reloads_total", outcome="refused") >= 2,
                   what="the watcher refusing v3")
        assert metric(c, "sine_bundle_behind_current") == 1     # current names what is not served
        assert metric(c, "sine_bundle_watcher_up") == 1
        seen = metric(c, "sine_bundle_watch_timestamp_seconds")
        wait_until(lambda: metric(c, "sine_bundle_watch_timestamp_seconds") > seen, 15.0,
                   what="the watcher still looking (with backoff)")
        bundle_mod.set_current(root, "v2")
        wait_until(lambda: c.post("/recommend", json={"user_id": "u", "n": 3}).json()["version"]
                   == "v2", what="the good version published afterwards")
        wait_until(lambda: metric(c, "sine_bundle_behind_current") == 0, what="caught up")
        assert metric(c, "sine_failures_total", reason="internal") == 0


def test_a_broken_manifest_at_start_is_a_clear_reason(root, serve):
    broken(root, "bad", "no-D")
    with serve(Settings(bundle=str(root / "bad"), watch_interval_s=0), ready=False) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "model.D" in r.json()["detail"]


def test_bundle_details_need_the_admin_token(root, serve):
    with serve(Settings(bundle=str(root), watch_interval_s=0, admin_token="s3cret")) as c:
        public = c.get("/bundle").json()
        assert public == {"version": "v1", "created": public["created"],
                          "items": {"count": 300}, "index": {"factory": "Flat"},
                          "default_search": {"mode": "aggregate", "merge": None}}
        assert "git_commit" not in public and "libraries" not in public
        full = c.get("/bundle", headers=auth()).json()
        assert {"git_commit", "libraries", "offline_metrics", "dataset", "serving"} <= set(full)
        assert full["default_search"] == public["default_search"]
        assert "git_commit" not in c.get("/bundle", headers=auth("wrong")).json()
    with serve(Settings(bundle=str(root), watch_interval_s=0, bundle_details_public=True)) as c:
        assert "libraries" in c.get("/bundle").json()


def test_a_root_without_current_waits_for_its_first_bundle(small_world, serve, tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    with serve(Settings(bundle=str(root), watch_interval_s=0.1), ready=False) as c:
        assert c.get("/readyz").status_code == 503
        assert metric(c, "sine_bundle_watcher_up") == 1
        shutil.copytree(small_world["root"] / "v1", root / "v1")
        bundle_mod.set_current(root, "v1")
        wait_until(lambda: c.get("/readyz").status_code == 200, 10.0, "the first bundle served")
        assert c.post("/recommend", json={"user_id": "u", "n": 3}).json()["version"] == "v1"


def test_a_failed_load_is_retried_though_current_does_not_move(root, serve):
    broken(root, "v3", "missing")
    with serve(Settings(bundle=str(root), watch_interval_s=0.1)) as c:
        bundle_mod.set_current(root, "v3")
        wait_until(lambda: metric(c, "sine_reloads_total", outcome="refused") >= 1,
                   what="v3 refused")
        shutil.copy(root / "v1" / "popularity.npy", root / "v3" / "popularity.npy")  # the fault passes
        wait_until(lambda: c.post("/recommend", json={"user_id": "u", "n": 3}).json()["version"]
                   == "v3", 10.0, "v3 served once it loads")
        assert metric(c, "sine_bundle_behind_current") == 0


def test_a_pinned_bundle_that_failed_at_start_is_retried(root, serve):
    broken(root, "v3", "missing")
    with serve(Settings(bundle=str(root / "v3"), watch_interval_s=0.1), ready=False) as c:
        assert c.get("/readyz").status_code == 503
        shutil.copy(root / "v1" / "popularity.npy", root / "v3" / "popularity.npy")
        wait_until(lambda: c.get("/readyz").status_code == 200, 10.0, "the pinned bundle served")
        wait_until(lambda: metric(c, "sine_bundle_watcher_up") == 0, 5.0, "the retries ended")


def test_liveness_fails_once_no_bundle_was_served_for_too_long(small_world, serve, tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    s = Settings(bundle=str(root), watch_interval_s=0.1, liveness_without_bundle_s=1.0)
    with serve(s, ready=False) as c:
        wait_until(lambda: c.get("/livez").status_code == 503, 10.0, "liveness failing")
        r = c.get("/livez")
        assert "SINE_LIVENESS_WITHOUT_BUNDLE_S" in r.json()["detail"]
        shutil.copytree(small_world["root"] / "v1", root / "v1")
        bundle_mod.set_current(root, "v1")
        wait_until(lambda: c.get("/livez").status_code == 200, 10.0, "alive once served")
