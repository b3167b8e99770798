import json
import shutil

import faiss
import numpy as np
import pytest

from index_builder import bundle
from index_builder.bundle import BundleError
from index_builder.make import make_bundle

QUIET = {"log": lambda *a: None}


def copy_bundle(small_world, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(small_world["bundle"].path, dst)
    return dst


def rewrite_manifest(path, **changes):
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))


def test_published_bundle_is_complete_and_current(small_world):
    root = small_world["root"]
    assert bundle.current_version(root) == "v1"
    b = bundle.load(root)
    m = b.manifest
    assert m["schema_version"] == 1 and m["version"] == "v1"
    assert m["model"]["D"] == 32 and m["model"]["K"] == 3 and m["model"]["n"] == 20
    assert m["onnx"]["opset"] >= 17 and m["index"]["metric"] == "inner_product"
    assert m["index"]["factory"] == "Flat" and m["index"]["recall"]["value"] == pytest.approx(1.0)
    assert m["items"]["vocab_sha256"] == small_world["ds"].vocab_sha256()
    # the model, kept, and the synthetic items' titles
    assert set(m["files"]) == set(bundle.FILES.values()) | {"model.pt", "titles.json"}
    assert b.has("model") and b.file("model").stat().st_size > 0
    assert b.titles()[small_world["ds"].item_ids[1]] == small_world["ds"].titles[1]
    assert {"faiss", "onnxruntime", "numpy", "torch"} <= set(m["libraries"])
    assert "HR@10" in m["offline_metrics"]["test"]


def test_id_mapping_round_trip(small_world):
    b = bundle.load(small_world["root"])
    index, ids = b.read_index(), b.item_ids()
    xb = np.load(small_world["export"] / "items.npy")
    for internal in (1, 17, len(ids) - 1):
        _, I = index.search(xb[internal - 1:internal], 1)
        assert I[0, 0] == internal                           # an item finds itself first
        assert ids[internal] == small_world["ds"].item_ids[internal]
    assert index.ntotal == len(ids) - 1


def test_missing_file(small_world, tmp_path):
    d = copy_bundle(small_world, tmp_path)
    (d / "popularity.npy").unlink()
    with pytest.raises(BundleError, match="file popularity.npy is missing"):
        bundle.load(d)


def test_hash_mismatch(small_world, tmp_path):
    d = copy_bundle(small_world, tmp_path)
    with open(d / "encoder.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="encoder.onnx: sha256 .* does not match"):
        bundle.load(d)


def test_a_process_hashes_a_file_once_and_again_when_it_changes(small_world, tmp_path,
                                                                 monkeypatch):
    from index_builder.bundle import loading
    d = copy_bundle(small_world, tmp_path)
    calls = []
    real = loading.sha256_file
    monkeypatch.setattr(loading, "sha256_file", lambda p: calls.append(p.name) or real(p))
    bundle.load(d, deep=False)
    first = sorted(calls)
    assert "encoder.onnx" in first and "index.faiss" in first
    bundle.load(d, deep=False)
    bundle.load(d, deep=False)
    assert sorted(calls) == first                                   # the second and third: none
    with open(d / "encoder.onnx", "r+b") as f:                      # in place: same inode and size
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="encoder.onnx: sha256 .* does not match"):
        bundle.load(d, deep=False)


def test_unknown_schema_version_and_bad_manifest(small_world, tmp_path):
    d = copy_bundle(small_world, tmp_path)
    rewrite_manifest(d, schema_version=99)
    with pytest.raises(BundleError, match="schema version 99 is not supported"):
        bundle.load(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        bundle.load(d)
    (d / "manifest.json").unlink()
    with pytest.raises(BundleError, match="neither a bundle"):
        bundle.load(d)


def test_dimension_mismatch_between_encoder_and_index(small_world, tmp_path):
    d = copy_bundle(small_world, tmp_path)
    n = small_world["ds"].n_items
    other = faiss.IndexIDMap2(faiss.IndexFlatIP(16))
    other.add_with_ids(np.random.default_rng(0).normal(size=(n, 16)).astype("float32"),
                       np.arange(1, n + 1))
    faiss.write_index(other, str(d / "index.faiss"))
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["index.faiss"] = bundle.sha256_file(d / "index.faiss")
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="index has dimension 16 but the encoder's user vector has 32"):
        bundle.load(d)


def test_vocabulary_mismatch(small_world, tmp_path):
    d = copy_bundle(small_world, tmp_path)
    ids = json.loads((d / "item_ids.json").read_text())
    ids[1], ids[2] = ids[2], ids[1]
    (d / "item_ids.json").write_text(json.dumps(ids))
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["item_ids.json"] = bundle.sha256_file(d / "item_ids.json")
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="vocabulary hash differ"):
        bundle.load(d)


def test_crash_mid_write_leaves_current_on_the_old_version(small_world, tmp_path, monkeypatch):
    root = tmp_path / "root"
    make_bundle(small_world["export"], root, version="old", **QUIET)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(faiss, "write_index", boom)
    with pytest.raises(OSError, match="disk full"):
        make_bundle(small_world["export"], root, version="new", **QUIET)
    assert bundle.current_version(root) == "old"
    assert sorted(p.name for p in root.iterdir()) == ["current", "old"], "no staging left behind"
    bundle.load(root)


def test_recall_gate_writes_nothing(small_world, tmp_path):
    from index_builder.build import IndexBuildError
    root = tmp_path / "root"
    with pytest.raises(IndexBuildError, match="below the floor"):
        make_bundle(small_world["export"], root, factory="IVF16,PQ2", params={"nprobe": 1},
                    floor=0.99, version="bad", **QUIET)
    assert not root.exists() or list(root.iterdir()) == []


def test_versions_are_immutable_and_current_can_move(small_world, tmp_path):
    root = tmp_path / "root"
    make_bundle(small_world["export"], root, version="a", **QUIET)
    make_bundle(small_world["export"], root, version="b", make_current=False, **QUIET)
    assert bundle.current_version(root) == "a"
    with pytest.raises(BundleError, match="already exists"):
        make_bundle(small_world["export"], root, version="a", **QUIET)
    bundle.set_current(root, "b")
    assert bundle.load(root).version == "b"
    with pytest.raises(BundleError, match="no such bundle version"):
        bundle.set_current(root, "zzz")


def test_export_folder_problems(tmp_path, small_world):
    with pytest.raises(BundleError, match="no export.json"):
        make_bundle(tmp_path, tmp_path / "root", **QUIET)
    e = tmp_path / "e"
    shutil.copytree(small_world["export"], e)
    (e / "queries.npy").unlink()
    with pytest.raises(BundleError, match="queries.npy is missing"):
        make_bundle(e, tmp_path / "root", **QUIET)


@pytest.mark.parametrize("change, says", [
    (lambda m: m["model"].pop("D"), "model.D"),
    (lambda m: m["model"].update(K="4"), "model.K"),
    (lambda m: m["items"].pop("vocab_sha256"), "items.vocab_sha256"),
    (lambda m: m.update(version="../v0"), "not a version name"),
    (lambda m: m["model"].update(n=0), "must be positive"),
    (lambda m: m.update(serving={"mode": "both", "merge": None}), "serving.mode is 'both'"),
    (lambda m: m.update(serving="aggregate"), "serving.mode is None"),
    (lambda m: m.update(serving={"mode": "per_interest", "merge": "median"}),
     "per_interest needs one of max, weighted, quota"),
    (lambda m: m.update(serving={"mode": "per_interest"}), "serving.merge is None"),
    (lambda m: m.update(serving={"mode": "aggregate", "merge": "max"}), "must be null"),
    (lambda m: (m["model"].update(K=1), m.update(serving={"mode": "per_interest",
                                                          "merge": "max"})), "K = 1 interest")])
def test_a_manifest_lacking_a_field_is_a_bundle_error(small_world, tmp_path, change, says):
    b = copy_bundle(small_world, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    change(m)
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=says):
        bundle.load(b, deep=False)


def test_the_default_search_comes_from_the_manifest(small_world, tmp_path):
    assert small_world["bundle"].serving == ("aggregate", None)
    b = copy_bundle(small_world, tmp_path)
    rewrite_manifest(b, serving={"mode": "per_interest", "merge": "quota", "chosen_on": "x"})
    assert bundle.load(b, deep=False).serving == ("per_interest", "quota")
    m = json.loads((b / "manifest.json").read_text())
    del m["serving"]                                   # a bundle built before `serving` existed
    (b / "manifest.json").write_text(json.dumps(m))
    assert bundle.load(b, deep=False).serving == ("aggregate", None)


def test_build_index_carries_the_exports_serving(small_world, tmp_path):
    e = tmp_path / "e"
    shutil.copytree(small_world["export"], e)
    info = json.loads((e / "export.json").read_text())
    info["serving"] = {"mode": "per_interest", "merge": "weighted", "chosen_on": "valid HR@50"}
    (e / "export.json").write_text(json.dumps(info))
    b = make_bundle(e, tmp_path / "root", version="v2", **QUIET)
    assert b.manifest["serving"] == info["serving"] and b.serving == ("per_interest",
                                                                             "weighted")
    info["serving"]["merge"] = "median"                # refused before it can be published
    (e / "export.json").write_text(json.dumps(info))
    with pytest.raises(BundleError, match="serving.merge is 'median'"):
        make_bundle(e, tmp_path / "root", version="v3", **QUIET)
    assert [p.name for p in bundle.versions(tmp_path / "root")] == ["v2"]


def test_the_contract_names_the_services_modes_and_merges():
    from typing import get_args

    from index_builder.bundle import MERGES
    from service.stages import Mode
    assert bundle.MERGES == MERGES and bundle.MODES == get_args(Mode)


def test_versions_are_pruned_and_staging_swept(small_world, tmp_path):
    import os
    import time

    from tests.helpers import aged_versions
    root = tmp_path / "root"
    aged_versions(small_world["root"] / "v1", root, 6)
    bundle.set_current(root, "v1")
    removed = bundle.prune_versions(root, keep=2, protect={"v2"})
    assert sorted(removed) == ["v0", "v3"]                  # current (v1) and v2 are kept
    assert sorted(p.name for p in bundle.versions(root)) == ["v1", "v2", "v4", "v5"]
    assert bundle.prune_versions(root, keep=0) == []        # 0: keep all
    fresh, stale = bundle.staging_dir(root, "a"), bundle.staging_dir(root, "b")
    (root / ".staging-c-x.tar.gz").write_bytes(b"half a download")
    old = time.time() - 7 * 3600
    os.utime(stale, (old, old))
    os.utime(root / ".staging-c-x.tar.gz", (old, old))
    assert sorted(bundle.sweep_staging(root, 6 * 3600)) == sorted([stale.name, ".staging-c-x.tar.gz"])
    assert fresh.exists() and not stale.exists()


def test_titles_are_read_only_when_their_hash_matches(small_world, tmp_path):
    dst = copy_bundle(small_world, tmp_path)
    assert bundle.load(dst, deep=False).titles()                     # as published
    (dst / "titles.json").write_text(json.dumps({"1": "<script>forged</script>"}))
    assert bundle.load(dst, deep=False, optional=False).titles() == {}   # replaced: none
    (dst / "titles.json").unlink()
    assert bundle.load(dst, deep=False, optional=False).titles() == {}
