import json
import os
import shutil

import pytest
import torch

from index_builder import bundle
from model_export import data
from model_export.data import split
from model_export.evaluation.evaluate import evaluate_popularity
from model_export.training import (
    CheckpointError,
    TrainConfig,
    atomic_save,
    load_checkpoint,
    model_from_checkpoint,
    train,
)
from model_export.training.workflow import evaluate_checkpoint, model_config

SMALL = dict(D=32, K=3, L=12)


@pytest.fixture(scope="module")
def ds():
    return data.synthetic(n_users=400, n_items=120, n_categories=8, length=(8, 20), seed=0)


def cfg(**kw) -> TrainConfig:
    base = dict(batch_size=64, max_epochs=2, patience=5, seed=7, threads=2)
    base.update(kw)
    return TrainConfig(**base)


def test_short_training_beats_popularity_by_a_clear_margin(ds, tmp_path):
    res = train(ds, model_config(ds, **SMALL), cfg(max_epochs=4, lr=3e-3), tmp_path, progress=False)
    out = evaluate_checkpoint(tmp_path / "best.pt", ds, tmp_path)
    sine, pop = out["metrics"]["test"]["SINE"], out["metrics"]["test"]["Popularity"]
    assert sine["HR@10"] > 3 * pop["HR@10"] and sine["HR@10"] > 0.25, (sine, pop)
    assert sine["NDCG@10"] > 3 * pop["NDCG@10"]
    assert res.best_epoch >= 1 and len(res.history) == res.epochs_run
    assert (tmp_path / "report.md").read_text().startswith("# SINE on synthetic")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert out["concepts"]["nmi"] > 0.2, "prototypes should recover the planted categories"


def test_training_is_reproducible_and_resume_continues_exactly(ds, tmp_path):
    mc = model_config(ds, **SMALL)
    a = train(ds, mc, cfg(max_epochs=2), tmp_path / "a", progress=False)
    b1 = train(ds, mc, cfg(max_epochs=1), tmp_path / "b", progress=False)
    b2 = train(ds, mc, cfg(max_epochs=2), tmp_path / "b", resume=tmp_path / "b" / "last.pt",
               progress=False)
    assert b1.epochs_run == 1 and b2.epochs_run == 2
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b2.history], rel=1e-5)
    wa = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    wb = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


@pytest.mark.parametrize("arch, extra", [("sine", {}), ("sine", {"blocks": 1, "aggregation": "latest"}),
                                         ("sasrec", {})])
def test_dense_targets_train_every_pair_once_and_resume_exactly(ds, tmp_path, arch, extra):
    mc = model_config(ds, arch, D=32, **({"K": 3, "L": 12} if arch == "sine" else {}), **extra)
    dense = dict(targets="dense", stride=10, lr=3e-3, batch_size=16)   # 434 windows: 27 steps
    a = train(ds, mc, cfg(max_epochs=3, **dense), tmp_path / "a", progress=False)
    b1 = train(ds, mc, cfg(max_epochs=1, **dense), tmp_path / "b", progress=False)
    b2 = train(ds, mc, cfg(max_epochs=3, **dense), tmp_path / "b", resume=tmp_path / "b" / "last.pt",
               progress=False)
    assert b1.epochs_run == 1 and b2.epochs_run == 3
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b2.history], rel=1e-5)
    assert a.history[1]["loss"] < a.history[0]["loss"]
    pop = evaluate_popularity(ds, split(ds), "valid")
    assert a.best_valid["HR@10"] > 1.5 * pop["HR@10"], (a.best_valid, pop)


def test_dense_targets_are_checked():
    with pytest.raises(ValueError, match="targets must be one of"):
        TrainConfig(targets="every")
    with pytest.raises(ValueError, match="stride must be >= 1"):
        TrainConfig(targets="dense", stride=0)


def test_early_stopping_keeps_the_best_checkpoint(ds, tmp_path):
    res = train(ds, model_config(ds, **SMALL), cfg(max_epochs=6, patience=1, lr=3e-2), tmp_path,
                progress=False)
    best = load_checkpoint(tmp_path / "best.pt")
    scores = [h["valid_NDCG@10"] for h in res.history]
    assert best["epoch"] + 1 == res.best_epoch == scores.index(max(scores)) + 1


def test_no_validation_gain_stops_after_patience_epochs(ds, tmp_path):
    # lr 0: the model never changes, so epoch 1 stays the best and patience 2 ends epoch 3
    res = train(ds, model_config(ds, **SMALL), cfg(max_epochs=6, patience=2, lr=0.0), tmp_path,
                progress=False)
    assert res.stopped_because == "early_stopping"
    assert res.best_epoch == 1 and res.epochs_run == 3
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 0


def test_sampled_loss_trains(ds, tmp_path):
    res = train(ds, model_config(ds, **SMALL), cfg(max_epochs=4, lr=3e-3, loss="sampled", num_negatives=40),
                tmp_path, progress=False)
    sp = split(ds)
    pop = evaluate_popularity(ds, sp, "valid")
    assert res.best_valid["HR@10"] > 2 * pop["HR@10"]
    assert load_checkpoint(tmp_path / "best.pt")["loss_kind"] == "sampled"


def test_lambda_changes_the_loss(ds, tmp_path):
    a = train(ds, model_config(ds, **SMALL), cfg(max_epochs=1, lam=0.0), tmp_path / "a", progress=False)
    b = train(ds, model_config(ds, **SMALL), cfg(max_epochs=1, lam=50.0), tmp_path / "b", progress=False)
    assert a.history[0]["reg"] != pytest.approx(b.history[0]["reg"], rel=0.05)


def test_checkpoint_from_another_vocabulary_or_config_is_refused(ds, tmp_path):
    train(ds, model_config(ds, **SMALL), cfg(max_epochs=1), tmp_path, progress=False)
    other = data.synthetic(n_users=400, n_items=120, n_categories=8, length=(8, 20), seed=1)
    with pytest.raises(CheckpointError, match="vocabulary"):
        load_checkpoint(tmp_path / "best.pt", other)
    with pytest.raises(CheckpointError, match="resume with the same settings"):
        train(ds, model_config(ds, D=16, K=3, L=12), cfg(max_epochs=2), tmp_path,
              resume=tmp_path / "last.pt", progress=False)
    ck = load_checkpoint(tmp_path / "best.pt")
    ck["model_args"]["D"] = 64
    with pytest.raises(CheckpointError, match="does not match"):
        model_from_checkpoint(ck)


def test_unreadable_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"hello": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


class _Payload:
    """What a hostile model.pt holds: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_and_never_run(small_world, tmp_path):
    """Warm start reads a bundle's model.pt; whoever can write to the bundle store must not get
    code execution in the refresh job from it."""
    from model_export.training import warm_start_source

    marker = tmp_path / "pwned"
    ck = torch.load(small_world["checkpoint"], weights_only=True)
    ck["model_args"] = {**ck["model_args"], "extra": _Payload(marker)}
    torch.save(ck, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    root = tmp_path / "bundles"                          # the same inside a bundle's model.pt
    shutil.copytree(small_world["root"] / "v1", root / "v1")
    torch.save(ck, root / "v1" / "model.pt")
    m = json.loads((root / "v1" / "manifest.json").read_text())
    m["files"]["model.pt"] = bundle.sha256_file(root / "v1" / "model.pt")   # hashes agree
    (root / "v1" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="refused"):
        warm_start_source(root / "v1")
    assert not marker.exists()
    assert load_checkpoint(small_world["checkpoint"])["format"] == 1   # ours still load


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path):
    p = tmp_path / "best.pt"
    atomic_save({"v": 1}, p)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"v": Boom()}, p)
    assert torch.load(p)["v"] == 1
    assert os.listdir(tmp_path) == ["best.pt"], "no temporary file left behind"


def test_too_few_samples_for_one_batch(tmp_path):
    tiny = data.synthetic(n_users=3, n_items=20, n_categories=2, seed=0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(tiny, model_config(tiny, **SMALL), cfg(batch_size=512), tmp_path, progress=False)


def test_history_file_is_written_each_epoch(ds, tmp_path):
    train(ds, model_config(ds, **SMALL), cfg(max_epochs=2), tmp_path, progress=False)
    hist = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]
    assert {"loss", "valid_HR@10", "samples_per_s"} <= set(hist[0])


@pytest.mark.data
@pytest.mark.slow
def test_one_epoch_on_ml100k_beats_popularity(data_dir, tmp_path):
    """CI's short run on real data: one epoch, D = 64, about half a minute on 2 cores."""
    from tests.conftest import require_data
    require_data("ml-100k", "u.data")
    ds = data.load("ml-100k", data_dir)
    train(ds, model_config(ds, D=64), cfg(max_epochs=1, batch_size=128), tmp_path, progress=False)
    out = evaluate_checkpoint(tmp_path / "best.pt", ds)["metrics"]["test"]
    sine, pop = out["SINE"], out["Popularity"]
    assert sine["HR@50"] > 1.5 * pop["HR@50"], (sine, pop)
    assert sine["NDCG@10"] > 1.3 * pop["NDCG@10"], (sine, pop)


def test_progress_in_a_log_is_a_line_a_minute_not_a_frame_per_update(monkeypatch):
    from model_export.training import loop

    lines: list[str] = []
    clock = iter(range(0, 10_000, 20))                 # 20 s per update
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    bar = loop._minute_lines(lines.append)(total=10, desc="epoch 1/3")
    for _ in range(10):
        bar.set_postfix(loss="5.0")
        bar.update(1)
    bar.close()
    assert len(lines) == 3                              # one a minute over 200 s
    assert lines[0] == "epoch 1/3: 3/10 batches (30 %), loss 5.0"
    assert all("\r" not in ln for ln in lines)
