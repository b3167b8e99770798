"""Warm starts with a growing vocabulary, and `sine refresh` end to end: clicks posted to a
running service (new items among them), refreshed, gated, published and hot-reloaded; a
degraded candidate refused while the old bundle keeps serving."""
import json
import re
import shutil

import numpy as np
import pytest
import torch

from index_builder import bundle as bundle_mod
from model_export import data
from model_export.freshness.refresh import holdout
from model_export.models.sine import SINE
from model_export.training import CheckpointError, TrainConfig, load_checkpoint, train, warm_start, warm_start_source
from model_export.training.workflow import model_config
from service.settings import Settings
from sine_cli.main import main
from tests.helpers import gauge_reaches, metric, wait_until


def grown(ds, n_new=3):
    """ds plus clicks on new items by its first users, one second apart."""
    clicks = [(ds.user_ids[u], f"new-{u % n_new}", 1000.0 + u) for u in range(30)]
    return data.extend(ds, clicks), clicks


def grown_three_each(ds):
    """ds plus three clicks on new items by each of its first 30 users, so that one of each is a
    training target (the last two are valid and test)."""
    return data.extend(ds, [(ds.user_ids[u], f"new-{(u + r) % 3}", 1000.0 + 3 * u + r)
                            for u in range(30) for r in range(3)])


def shape(ck):
    return {k: v for k, v in ck["model_args"].items() if k != "n_items"}


def test_a_warm_start_keeps_known_items_and_centres_new_ones(small_world):
    ck = load_checkpoint(small_world["checkpoint"])
    ds2, _ = grown(small_world["ds"])
    assert ds2.n_items == small_world["ds"].n_items + 3
    model = SINE(model_config(ds2, **shape(ck)))
    fresh_mask = warm_start(model, ck, ds2, seed=1)
    assert int(fresh_mask.sum()) == 3 and not fresh_mask[0]
    assert ds2.n_items - int(fresh_mask.sum()) == small_world["ds"].n_items
    old = {x: i for i, x in enumerate(ck["item_ids"])}
    H_old, H = ck["model"]["H.weight"], model.H.weight.detach()
    for j, x in enumerate(ds2.item_ids[1:], 1):
        if x in old:
            assert torch.equal(H[j], H_old[old[x]]), x          # by external id, not position
    fresh = H[[ds2.item_index()[f"new-{k}"] for k in range(3)]]
    spread = H_old[1:].std(0)
    assert ((fresh - H_old[1:].mean(0)).abs() < 0.5 * spread).all()   # near the centre
    assert torch.equal(model.C.detach(), ck["model"]["C"]) and H[0].abs().sum() == 0
    with pytest.raises(CheckpointError, match="differs"):
        warm_start(SINE(model_config(ds2, D=16, K=2, L=4)), ck, ds2)


def test_neighbour_rows_start_a_new_item_among_what_its_clickers_watch(small_world):
    """A new item starts at the count-weighted mean of the old rows of the items clicked just
    before and after it, plus the same small noise as the mean start."""
    ck = load_checkpoint(small_world["checkpoint"])
    ds = small_world["ds"]
    ds2, clicks = grown(ds)
    model = SINE(model_config(ds2, **shape(ck)))
    fresh_mask = warm_start(model, ck, ds2, seed=1, init="neighbours")
    old = {x: i for i, x in enumerate(ck["item_ids"])}
    H_old, H = ck["model"]["H.weight"], model.H.weight.detach()
    idx = ds2.item_index()
    spread = H_old[1:].std(0)
    for k in range(3):
        j = idx[f"new-{k}"]
        assert fresh_mask[j]
        # brute force: every click on it, its neighbours in the sequence
        near = []
        for s in ds2.sequences:
            s = [int(t) for t in s]
            for p, t in enumerate(s):
                if t == j:
                    near += [s[q] for q in (p - 1, p + 1) if 0 <= q < len(s)
                             and ds2.item_ids[s[q]] in old]
        want = torch.stack([H_old[old[ds2.item_ids[q]]] for q in near]).mean(0)
        assert ((H[j] - want).abs() <= 0.5 * spread).all()
        # and it is nearer its neighbours' mean than the global mean is
        assert (H[j] - want).norm() < (H_old[1:].mean(0) - want).norm()
    with pytest.raises(ValueError, match="new_item_init"):
        TrainConfig(new_item_init="random")


def test_oversampling_repeats_the_windows_that_end_in_a_new_item(small_world, tmp_path):
    ds2 = grown_three_each(small_world["ds"])
    ck = load_checkpoint(small_world["checkpoint"])
    lines = []
    train(ds2, model_config(ds2, **shape(ck)),
          TrainConfig(max_epochs=1, threads=2, batch_size=64, new_item_oversample=4),
          tmp_path, progress=False, warm_start_from=small_world["root"], log=lines.append)
    (said,) = [ln for ln in lines if "windows end in a new item" in ln]
    hit = int(said.split()[0].replace(",", ""))
    assert hit > 0 and f"{3 * hit:,} more an epoch" in said
    with pytest.raises(ValueError, match="new_item_oversample"):
        TrainConfig(new_item_oversample=0)


def test_new_rows_only_moves_the_new_rows_and_nothing_else(small_world, tmp_path):
    ds, ds2 = small_world["ds"], grown_three_each(small_world["ds"])
    ck = load_checkpoint(small_world["checkpoint"])
    start = SINE(model_config(ds2, **shape(ck)))
    fresh = warm_start(start, ck, ds2, seed=42, init="neighbours")    # the trainer's own seed
    lines = []
    train(ds2, model_config(ds2, **shape(ck)),
          TrainConfig(max_epochs=2, threads=2, batch_size=64, new_item_init="neighbours",
                      new_rows_only=True),
          tmp_path, progress=False, warm_start_from=small_world["root"], log=lines.append)
    (said,) = [ln for ln in lines if "new rows only: 3 rows learn" in ln]
    hit, others = (int(x.replace(",", "")) for x in re.search(
        r"on ([\d,]+) windows that end in one and ([\d,]+) others", said).groups())
    windows = len(data.split(ds2, shape(ck)["n"]).train_targets)
    assert hit > 0 and others == min(24 * hit * 8, windows - hit)      # the replay beside them
    after = torch.load(tmp_path / "last.pt", weights_only=False)["model"]
    before = start.state_dict()
    for name, t in before.items():
        if name != "H.weight":
            assert torch.equal(after[name], t), name                     # frozen exactly
    assert torch.equal(after["H.weight"][~fresh], before["H.weight"][~fresh])
    moved = (after["H.weight"][fresh] - before["H.weight"][fresh]).norm(dim=1)   # [3]
    assert (moved > 1e-4).all()
    # no new item, nothing to fit: said, not a silent no-op
    with pytest.raises(data.DataError, match="no new rows to fit"):
        train(ds, model_config(ds, **shape(ck)), TrainConfig(max_epochs=1, new_rows_only=True),
              tmp_path / "none", progress=False, warm_start_from=small_world["root"],
              log=lambda *a: None)


def test_new_rows_only_needs_a_model_to_fit_into(small_world, tmp_path, capsys):
    args = ["train", "--dataset", "synthetic", "--epochs", "1", "--new-rows-only",
            "--out", str(tmp_path)]
    assert main(args) == 2
    assert "give --warm-start" in capsys.readouterr().err


@pytest.mark.parametrize("extra, says", [
    (["--new-item-oversample", "0"], "new_item_oversample must be >= 1"),
    (["--new-rows-only", "--new-rows-replay", "-1"], "new_rows_replay must be >= 0"),
    (["--new-rows-only", "--from-scratch"], "give one of them"),
])
def test_refresh_refuses_bad_new_item_options_before_any_work(tmp_path, capsys, extra, says):
    args = ["refresh", "--dataset", "synthetic", "--bundle-root", str(tmp_path / "b"),
            "--redis-url", "redis://127.0.0.1:1/0", "--clicks-dir", str(tmp_path / "c"),
            "--work-dir", str(tmp_path / "w"), *extra]
    assert main(args) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "w").exists()


def test_a_bundle_holds_the_model_to_start_from(small_world, tmp_path):
    ck = warm_start_source(small_world["root"])
    assert ck["item_ids"] == small_world["ds"].item_ids
    plain = tmp_path / "old"
    shutil.copytree(small_world["root"] / "v1", plain)
    m = json.loads((plain / "manifest.json").read_text())
    del m["files"]["model.pt"]
    (plain / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="no model.pt"):
        warm_start_source(plain)


def test_zero_epochs_saves_the_starting_model(small_world, tmp_path):
    ds2, _ = grown(small_world["ds"])
    ck = load_checkpoint(small_world["checkpoint"])
    res = train(ds2, model_config(ds2, **shape(ck)), TrainConfig(max_epochs=0, threads=2),
                tmp_path, progress=False, warm_start_from=small_world["root"], log=lambda *a: None)
    assert res.epochs_run == 0 and res.stopped_because == "no_epochs"
    best = load_checkpoint(tmp_path / "best.pt", ds2)
    assert torch.equal(best["model"]["C"], ck["model"]["C"])


@pytest.mark.parametrize("serving", [None, {"mode": "per_interest", "merge": "max"}])
def test_the_gate_scores_a_bundle_with_its_default_search(small_world, tmp_path, serving):
    """score_bundle against brute force over the encoder and the item table (the index is
    exact at this size): the aggregate, or the best interest's score under the max merge."""
    import onnxruntime as ort

    from model_export.freshness.gate import score_bundle
    b = tmp_path / "b"
    shutil.copytree(small_world["bundle"].path, b)
    m = json.loads((b / "manifest.json").read_text())
    m.pop("serving", None)
    if serving:
        m["serving"] = serving
    (b / "manifest.json").write_text(json.dumps(m))
    ds, k = small_world["ds"], 10
    ext = ds.item_ids
    hist = {f"u{u}": [ext[int(i)] for i in ds.sequences[u][:-1]] for u in range(60)}
    targets = {f"u{u}": ext[int(ds.sequences[u][-1])] for u in range(60)}
    got = score_bundle(b, hist, targets, k)
    assert got["search"] == ("per_interest/max" if serving else "aggregate")
    sess = ort.InferenceSession(str(b / "encoder.onnx"), providers=["CPUExecutionProvider"])
    items = np.load(small_world["export"] / "items.npy")                      # [M, D]
    n, hits = m["model"]["n"], 0
    for u in range(60):
        seen = [int(i) for i in ds.sequences[u][:-1]]
        win = np.zeros((1, n), dtype=np.int64)
        newest = seen[::-1][:n]
        win[0, :len(newest)] = newest
        interests, uv, _ = sess.run(None, {"item_ids": win})
        q = interests[0] if serving else uv                                   # [Q, D]
        score = (q @ items.T).max(0)                                          # [M]
        score[np.array(seen) - 1] = -np.inf
        hits += int(ds.sequences[u][-1]) in (np.argsort(-score, kind="stable")[:k] + 1)
    assert got["users"] == 60 and got[f"HR@{k}"] == pytest.approx(hits / 60)


def test_the_holdout_is_each_active_users_last_click():
    clicks = [("a", "1", 10.0, "e1"), ("a", "2", 30.0, "e2"), ("b", "3", 5.0, "e3"),
              ("c", "4", 25.0, "e4"), ("c", "5", 25.0, "e5")]
    train_clicks, held = holdout(clicks, since=20.0)
    assert held == {"a": "2", "c": "5"}                      # b is not active since 20
    assert train_clicks == [("a", "1", 10.0), ("b", "3", 5.0), ("c", "4", 25.0)]


def test_retention_never_removes_a_pinned_version(small_world, tmp_path):
    from model_export.configs import RefreshConfig
    from model_export.freshness.refresh import RefreshReport, _retention
    from sine_cli.main import build_parser
    from tests.helpers import aged_versions
    root = tmp_path / "root"
    aged_versions(small_world["root"] / "v1", root, 5)
    bundle_mod.set_current(root, "v4")
    a = build_parser().parse_args(["refresh", "--dataset", "x", "--bundle-root", str(root),
                                   "--clicks-dir", str(tmp_path), "--keep-versions", "1",
                                   "--keep-version", "v0", "--keep-version", "v2"])
    assert a.keep_version == ["v0", "v2"]
    cfg = RefreshConfig(bundle_root=root, dataset="x", redis_url="redis://unused",
                        clicks_dir=tmp_path / "clicks", work_dir=tmp_path / "work",
                        keep_versions=a.keep_versions, pinned=tuple(a.keep_version))
    report = RefreshReport(outcome="published")
    _retention(cfg, root, report, None, {"v3"})
    assert sorted(report.retention["versions_removed"]) == ["v1"]
    assert [p.name for p in bundle_mod.versions(root)] == ["v0", "v2", "v3", "v4"]


@pytest.fixture
def live(small_world, own_redis, serve, tmp_path):
    """A private bundle root served with watching on, and the base data as a click log file."""
    root = tmp_path / "bundles"
    shutil.copytree(small_world["root"] / "v1", root / "v1")
    bundle_mod.set_current(root, "v1")
    ds = small_world["ds"]
    base = tmp_path / "base.csv"
    base.write_text("user_id,item_id,timestamp\n" + "".join(
        f"{u},{ds.item_ids[int(i)]},{t}\n" for u, s in zip(ds.user_ids, ds.sequences)
        for t, i in enumerate(s)))
    for u, s in zip(ds.user_ids, ds.sequences):                 # the histories, as served
        own_redis.client().rpush(f"sine:history:{u}", *[ds.item_ids[int(i)] for i in s[::-1]])
    settings = Settings(bundle=str(root), redis_url=own_redis.url, watch_interval_s=0.2,
                        history_keep=30)
    with serve(settings) as c:
        yield {"c": c, "root": root, "base": base, "ds": ds, "redis": own_redis, "tmp": tmp_path}


def refresh_args(w, *extra):
    return ["refresh", "--dataset", str(w["base"]), "--bundle-root", str(w["root"]),
            "--redis-url", w["redis"].url, "--clicks-dir", str(w["tmp"] / "clicks"),
            "--work-dir", str(w["tmp"] / "work"), "--train-minutes", "1", "--threads", "2",
            "--tolerance", "0.0", *extra]


def category(ds, c):
    return [ds.item_ids[j] for j in range(1, ds.n_items + 1) if ds.labels.get(j) == c]


@pytest.mark.slow
def test_refresh_publishes_a_model_that_retrieves_new_items(live, capsys):
    c, ds = live["c"], live["ds"]
    cat = ds.labels[1]                                        # the most popular item's category
    members = category(ds, cat)
    new = [f"fresh-{k}" for k in range(3)]
    rng = np.random.default_rng(0)
    users = ds.user_ids[:200]
    for u in users:                 # new items among a category's own; the last click, held out
        for step in range(7):       # for the gate, is a known one, so all three reach training
            item = new[step % 3] if step % 2 else members[int(rng.integers(len(members)))]
            assert c.post("/events", json={"user_id": u, "item_id": item}).status_code == 200
    assert c.post("/recommend", json={"user_id": users[0], "n": 3}).json()["version"] == "v1"
    rc = main(refresh_args(live, "--epochs", "4"))
    report = json.loads((live["root"] / "refresh.json").read_text())
    assert json.loads(capsys.readouterr().out)["outcome"] == "published"   # printed too
    assert rc == 0 and report["outcome"] == "published", report
    assert report["clicks"]["new_items"] == 3 and report["clicks"]["holdout_users"] == 200
    gate = report["gate"]["metrics"]
    assert gate["candidate"]["HR@50"] >= gate["live"]["HR@50"]
    version = report["version"]
    assert bundle_mod.current_version(live["root"]) == version
    wait_until(lambda: c.post("/recommend", json={"user_id": "x", "n": 3}).json()["version"]
               == version, 10.0, "the service serving the refreshed bundle")
    # a user who clicked the category's items now gets the new items among them
    probe = 0
    for k in range(10):
        u = f"probe-{k}"
        live["redis"].client().rpush(f"sine:history:{u}",
                                     *rng.choice(members, size=8, replace=False).tolist())
        got = [x["item_id"] for x in c.post("/recommend", json={"user_id": u, "n": 20}).json()
               ["items"]]
        probe += bool(set(got) & set(new))
    assert probe >= 7, probe
    assert metric(c, "sine_refresh_last", outcome="published", version=version) == 1
    gauge_reaches(c, "sine_click_log_lag", 0)


@pytest.mark.slow
def test_a_degraded_candidate_is_refused_and_the_old_bundle_serves_on(live):
    c, ds = live["c"], live["ds"]
    rng = np.random.default_rng(1)
    for u, s in list(zip(ds.user_ids, ds.sequences))[:150]:   # known items, not yet clicked,
        cat = ds.labels[int(s[-1])]                           # of the user's latest interest
        fresh = [x for x in category(ds, cat) if ds.item_index()[x] not in set(s.tolist())]
        for x in rng.choice(fresh, size=min(3, len(fresh)), replace=False):
            assert c.post("/events", json={"user_id": u, "item_id": x}).status_code == 200
    before = sorted(p.name for p in live["root"].iterdir())
    rc = main(refresh_args(live, "--from-scratch", "--epochs", "0"))   # an untrained model
    report = json.loads((live["root"] / "refresh.json").read_text())
    assert rc == 3 and report["outcome"] == "refused", report
    gate = report["gate"]["metrics"]
    assert gate["candidate"]["HR@50"] < gate["live"]["HR@50"]
    assert bundle_mod.current_version(live["root"]) == "v1"
    assert sorted(p.name for p in live["root"].iterdir()) == sorted(before + ["refresh.json"])
    assert c.post("/recommend", json={"user_id": ds.user_ids[0], "n": 5}).json()["version"] == "v1"
    wait_until(lambda: metric(c, "sine_refresh_last", outcome="refused",
                              version=report["version"]) == 1, 5.0, "the refusal in /metrics")
    assert main(refresh_args(live)) == 4                      # nothing new since


@pytest.mark.slow
def test_the_gate_leaves_out_held_out_clicks_the_live_bundle_cannot_score(live):
    c, ds = live["c"], live["ds"]
    rng = np.random.default_rng(2)
    known = [ds.item_ids[j] for j in range(1, ds.n_items + 1)]
    users = ds.user_ids[:60]
    for k, u in enumerate(users):      # a third of the users' last click is a brand-new item
        last = f"brand-new-{k % 4}" if k % 3 == 0 else known[int(rng.integers(len(known)))]
        clicks = [*rng.choice(known, size=3, replace=False).tolist(), f"brand-new-{k % 4}", last]
        # clicks in one millisecond tie on time, and the holdout breaks ties by event id
        for n, item in enumerate(clicks):
            assert c.post("/events", json={"user_id": u, "item_id": item,
                                           "event_id": f"e{n}"}).status_code == 200
    main(refresh_args(live, "--epochs", "0"))
    gate = json.loads((live["root"] / "refresh.json").read_text())["gate"]
    assert gate["new_items"] == "exclude"
    assert gate["holdout_new_item_share"] == pytest.approx(20 / 60)
    m = gate["metrics"]
    assert m["candidate"]["users"] == m["live"]["users"] == 40           # compared: known only
    assert m["candidate_on_new_items"]["users"] == 20                     # reported beside
    # counted instead, the live bundle's sure misses join the comparison (an item new to every
    # bundle: the first cycle's candidate may have been published with the brand-new ones)
    for u in users:
        assert c.post("/events", json={"user_id": u, "item_id": "brand-newer-0"}).status_code == 200
    main(refresh_args(live, "--epochs", "0", "--gate-new-items", "count"))
    gate = json.loads((live["root"] / "refresh.json").read_text())["gate"]
    assert gate["new_items"] == "count" and gate["holdout_new_item_share"] > 0
    assert gate["metrics"]["live"]["users"] == 60
