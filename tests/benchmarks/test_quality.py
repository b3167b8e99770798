import json
import math

import numpy as np
import pytest

from benchmarks import quality

U = 400


def _run(runs, model, seed, hits, valid=0.5, converged=True):
    """A converged `benchmarks.accuracy` run folder as `quality.collect` reads it."""
    d = runs / "ml-1m" / f"{model}-quality-ml1m-s{seed}"
    d.mkdir(parents=True)
    hr = float(hits.mean())
    (d / "result.json").write_text(json.dumps({
        "variant": model, "label": model, "train_args": {"seed": seed},
        "stopped_because": "early_stopping" if converged else "time", "epochs": 5,
        "best_epoch": 2, "seconds": 60, "valid": {"HR@50": valid},
        "test": {"HR@10": hr / 2, "NDCG@10": hr / 4},
        "beyond": {"aggregate": {"diversity@50": 0.5, "coverage@50": 0.9}},
        "history": [{"valid_HR@50": valid}]}))
    np.savez(d / "test_hits.npz", **{"agg@50": hits, "agg@100": hits | (hits == 0)})


def _hits(seed, p):
    return (np.random.default_rng(seed).random(U) < p).astype(np.uint8)


@pytest.fixture
def no_groups(monkeypatch):
    monkeypatch.setattr(quality, "variety_groups", lambda dataset, data_dir: None)


def _main(runs, out):
    assert quality.main(["--runs-dir", str(runs), "--out", str(out)]) == 0
    return json.loads((out / "quality.json").read_text())["ml-1m"]


def test_the_default_is_paired_by_user_against_the_best_sasrec_by_validation(tmp_path, no_groups):
    runs, out = tmp_path / "runs", tmp_path / "out"
    sas, weak, sine = _hits(1, 0.5), _hits(2, 0.3), _hits(3, 0.55)
    _run(runs, "sasrec-dense", 42, sas, valid=0.6)
    _run(runs, "sasrec-d0-dense", 42, weak, valid=0.4)
    _run(runs, "sine", 42, sine)
    e = _main(runs, out)
    assert e["best_sasrec"] == "sasrec-dense"
    c = e["default_vs_sasrec"]
    d = sine.astype(float) - sas
    assert c["per_seed"][0]["diff"] == round(100 * d.mean(), 2)
    assert c["paired_se"] == round(100 * d.std(ddof=1) / math.sqrt(U), 2)
    assert c["met"] is (c["per_seed"][0]["z"] >= 2)
    md = (out / "quality.md").read_text()
    sweep = md[md.index("SASRec+'s configurations"):]
    assert sweep.index("`sasrec-dense`") < sweep.index("`sasrec-d0-dense`")   # by validation


def test_rows_whose_folders_are_gone_are_carried_with_their_comparisons(tmp_path, no_groups):
    out = tmp_path / "out"
    first, second = tmp_path / "a", tmp_path / "b"
    _run(first, "sasrec-dense", 42, _hits(1, 0.5), valid=0.6)
    _run(first, "sine", 42, _hits(3, 0.55))
    before = _main(first, out)["default_vs_sasrec"]["per_seed"][0]
    sas7, sine7 = _hits(4, 0.5), _hits(5, 0.45)
    _run(second, "sasrec-dense", 7, sas7, valid=0.6)
    _run(second, "sine", 7, sine7)
    e = _main(second, out)
    assert {(r["model"], r["seed"], r.get("kept", False)) for r in e["rows"]} == {
        ("sasrec-dense", 42, True), ("sine", 42, True),
        ("sasrec-dense", 7, False), ("sine", 7, False)}
    c = e["default_vs_sasrec"]
    s42, s7 = sorted(c["per_seed"], key=lambda s: s["seed"], reverse=True)
    assert s42 == {**before, "kept": True}                # as computed the first time
    assert s7["diff"] == round(100 * (sine7.astype(float) - sas7).mean(), 2) and "kept" not in s7
    # one seed's hits are gone: the pool is the seeds' mean, their errors as if independent
    assert c["diff"] == round((s42["diff"] + s7["diff"]) / 2, 2)
    assert c["paired_se"] == round(math.hypot(s42["paired_se"], s7["paired_se"]) / 2, 2)
    assert "†" in (out / "quality.md").read_text()


def test_a_new_best_sasrec_against_a_carried_row_is_unpaired(tmp_path, no_groups):
    out = tmp_path / "out"
    first, second = tmp_path / "a", tmp_path / "b"
    _run(first, "sasrec-dense", 42, _hits(1, 0.5), valid=0.6)
    sine = _hits(3, 0.55)
    _run(first, "sine", 42, sine)
    _main(first, out)
    better = _hits(6, 0.6)
    _run(second, "sasrec-d05-dense", 42, better, valid=0.7)
    e = _main(second, out)
    assert e["best_sasrec"] == "sasrec-d05-dense"
    s = e["default_vs_sasrec"]["per_seed"][0]
    p, q = sine.mean(), better.mean()
    assert s["paired"] is False
    assert s["diff"] == pytest.approx(100 * (p - q), abs=0.006)
    assert s["paired_se"] == pytest.approx(100 * math.sqrt((p * (1 - p) + q * (1 - q)) / U),
                                           abs=0.006)
    assert "unpaired" in (out / "quality.md").read_text()


def test_an_unconverged_row_enters_no_comparison(tmp_path, no_groups):
    runs, out = tmp_path / "runs", tmp_path / "out"
    _run(runs, "sasrec-dense", 42, _hits(1, 0.5), valid=0.6)
    _run(runs, "sine", 42, _hits(3, 0.55), converged=False)
    e = _main(runs, out)
    assert e["default_vs_sasrec"] is None
    assert "no converged run beside SASRec+ yet" in (out / "quality.md").read_text()


def test_the_best_sasrec_is_chosen_on_the_seeds_every_configuration_ran():
    def row(model, seed, valid):
        return {"model": model, "seed": seed, "valid_HR@50": valid, "converged": True}
    rows = [row("sasrec-dense", 42, 59.0), row("sasrec-dense", 7, 62.0),
            row("sasrec-lr2e3-dense", 42, 59.5), row("sine", 42, 70.0)]
    # over its own seeds the baseline averages 60.5; on seed 42, the one both ran, it is behind
    assert quality.best_sasrec(rows) == "sasrec-lr2e3-dense"
    rows.append({**row("sasrec-d0-dense", 42, 80.0), "converged": False})
    assert quality.best_sasrec(rows) == "sasrec-lr2e3-dense"       # unconverged rows do not count
    assert quality.best_sasrec([row("sine", 42, 70.0)]) is None
