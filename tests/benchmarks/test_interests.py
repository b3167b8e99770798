import json

import numpy as np
import pytest

from benchmarks import interests


@pytest.mark.slow
def test_the_screen_runs_each_configuration_and_merge_with_its_errors(tmp_path):
    runs, res = tmp_path / "runs", tmp_path / "results"
    assert interests.main(["--datasets", "synthetic", "--configs", "sine,ia-lse", "--seeds", "1",
                           "--max-minutes", "0.1", "--set", "D=16", "--set", "cos_penalty=0.2",
                           "--tag", "t", "--runs-dir", str(runs), "--results-dir", str(res)]) == 0
    out = json.loads((res / "accuracy-interests-t.json").read_text())
    rows = {r["variant"]: r for r in out["datasets"]["synthetic"]}
    assert set(rows) == {"sine", "ia-lse"}
    for r in rows.values():
        assert set(r["merges"]) == {"max", "weighted", "quota"}
        assert all(0 <= m["HR@50"] <= 1 for m in r["merges"].values())
        assert r["train_args"]["cos_penalty"] == 0.2          # --set reaches the trainer
        assert 0 <= r["diagnostics"]["assignment_entropy"] <= 1
        assert set(r["serving"]["valid"]) == {"aggregate", "per_interest/max",
                                              "per_interest/weighted", "per_interest/quota"}
    assert rows["ia-lse"]["train_args"]["interest_loss"] == "logsumexp"
    assert rows["sine"]["train_args"]["interest_weight"] == 0.0
    md = (res / "accuracy-interests-t.md").read_text()
    assert md.count(" ± ") >= 2 * 6 and "[`ia-lse`]" in md
    assert "Default search chosen on validation" in md


def test_the_serving_table_sets_the_pick_beside_the_best_on_test():
    r = _row("sine", 7, 0.50, 0.60, {h: {"HR@50": v} for h, v in
                                     (("max", 0.52), ("weighted", 0.49), ("quota", 0.48))})
    r["serving"] = {"mode": "per_interest", "merge": "weighted", "valid": {
        "aggregate": {"HR@50": 0.40}, "per_interest/max": {"HR@50": 0.41},
        "per_interest/weighted": {"HR@50": 0.43}, "per_interest/quota": {"HR@50": 0.42}}}
    md = interests.serving_table([r, _row("k1", 7, 0.5, 0.6)])
    assert md[2].startswith("| configuration | seed | valid aggregate | valid per_interest/max")
    assert md[4] == ("| sine | 7 | 40.00 | 41.00 | 43.00 | 42.00 | per_interest/weighted | "
                     f"49.00 ± {100 * interests.se(0.49, 10_000):.2f} | per_interest/max (52.00) |")
    assert len(md) == 6                              # K = 1 rows have no choice to show
    assert interests.serving_table([_row("k1", 7, 0.5, 0.6)]) == []


def test_a_standard_error_is_binomial():
    assert interests.se(0.5, 100) == pytest.approx(0.05)
    assert interests.se(0.0, 100) == 0.0


def _row(variant, seed, hr50, hr100, merges=None):
    return {"label": variant, "variant": variant, "seed": seed, "users": 10_000,
            "aggregate": {"HR@50": hr50, "HR@100": hr100}, "merges": merges or {}}


def test_a_second_seed_keeps_the_first_seeds_rows_and_sets_the_means_beside_k1(tmp_path):
    path = tmp_path / "accuracy-interests-t.json"
    first = {"k1": [_row("k1", 42, 0.50, 0.60)],
             "sine": [_row("sine", 42, 0.51, 0.63, {"max": {"HR@50": 0.45, "HR@100": 0.57}})]}
    path.write_text(json.dumps({"meta": {"command": "launch 42"}, "datasets": {
        "d": first["k1"] + first["sine"]}}))
    found = {"d": [_row("k1", 7, 0.52, 0.62),
                   _row("sine", 7, 0.55, 0.65, {"max": {"HR@50": 0.47, "HR@100": 0.59}}),
                   _row("sine", 42, 0.53, 0.64, {"max": {"HR@50": 0.46, "HR@100": 0.58}})]}
    rows, earlier = interests.keep_earlier(found, path)
    assert earlier == ["launch 42"]
    assert sorted((r["variant"], r["seed"], r["aggregate"]["HR@50"]) for r in rows["d"]) == [
        ("k1", 7, 0.52), ("k1", 42, 0.50), ("sine", 7, 0.55), ("sine", 42, 0.53)]  # rerun wins
    md = "\n".join(interests.seed_means(rows["d"]))
    se = 100 * (interests.se(0.54, 10_000) ** 2 + interests.se(0.51, 10_000) ** 2) ** 0.5
    assert f"| sine | 2 | agg | 54.00 | +3.00 ({3.0 / se:+.1f} SE) | +3.00, +3.00 |" in md
    assert "| sine | 2 | max | 46.50 | -4.50" in md
    assert "| k1 | 2 | max" not in md                      # K = 1: one list, no merges
    assert interests.seed_means([_row("k1", 1, 0.5, 0.6), _row("sine", 1, 0.5, 0.6)]) == []


def test_paired_differences_are_per_user_and_averaged_over_seeds():
    rng = np.random.default_rng(0)
    k1 = {sd: rng.random(400) < 0.5 for sd in (1, 2)}
    # the same users hit, plus 40 more that K = 1 missed: +0.10 exactly, per seed
    better = {}
    for sd, h in k1.items():
        b = h.copy()
        b[np.flatnonzero(~h)[:40]] = True
        better[sd] = b
    hits = {("d", "k1", sd): {"agg@50": k1[sd]} for sd in k1}
    hits.update({("d", "sine", sd): {"agg@50": better[sd], "max@50": k1[sd]} for sd in k1})
    hits[("d", "lonely", 3)] = {"agg@50": k1[1]}                 # no K = 1 of its seed
    out = interests.paired(hits)
    agg = out["d"]["sine"]["agg@50"]
    assert agg["diff"] == pytest.approx(0.10) and agg["seeds"] == [1, 2]
    d = np.mean([better[sd].astype(float) - k1[sd] for sd in k1], axis=0)
    assert agg["se"] == pytest.approx(d.std(ddof=1) / 20)
    assert out["d"]["sine"]["max@50"] == {"diff": 0.0, "se": 0.0, "seeds": [1, 2]}
    assert "lonely" not in out["d"] and "k1" not in out["d"]


def test_paired_figures_of_a_new_seed_pool_with_the_files_and_a_rerun_replaces_its_part(tmp_path):
    path = tmp_path / "accuracy-interests-t.json"
    old = {"agg@50": {"diff": 0.010, "se": 0.002, "seeds": [7, 42]},
           "max@50": {"diff": -0.02, "se": 0.004, "seeds": [7, 42]}}
    path.write_text(json.dumps({"meta": {"command": "launch 7,42"}, "datasets": {},
                                "paired": {"d": {"k8": old, "k2": old}}}))
    pairs = {"d": {"k8": {"agg@50": {"diff": 0.004, "se": 0.003, "seeds": [3]}}}}
    interests.keep_earlier({}, path, pairs)
    agg = pairs["d"]["k8"]["agg@50"]
    assert agg["diff"] == pytest.approx((2 * 0.010 + 0.004) / 3)
    assert agg["se"] == pytest.approx((2 * 0.002 + 0.003) / 3)     # no smaller than either's share
    assert agg["seeds"] == [3, 7, 42] and len(agg["parts"]) == 2
    assert pairs["d"]["k8"]["max@50"] == old["max@50"]              # a mode the launch lacks
    assert pairs["d"]["k2"] == old                                  # a configuration it lacks

    path.write_text(json.dumps({"meta": {}, "datasets": {}, "paired": pairs}))
    rerun = {"d": {"k8": {"agg@50": {"diff": 0.001, "se": 0.003, "seeds": [3]}}}}
    interests.keep_earlier({}, path, rerun)
    again = rerun["d"]["k8"]["agg@50"]
    assert again["diff"] == pytest.approx((2 * 0.010 + 0.001) / 3) and again["seeds"] == [3, 7, 42]

    both = {"d": {"k8": {"agg@50": {"diff": 0.0, "se": 0.001, "seeds": [3, 7]}}}}
    interests.keep_earlier({}, path, both)                   # shares 3 and 7 with the parts
    assert both["d"]["k8"]["agg@50"] == {"diff": 0.0, "se": 0.001, "seeds": [3, 7]}


def test_a_pooled_paired_figure_says_so_in_the_seed_means_table():
    rows = [_row("k1", sd, 0.50, 0.60) for sd in (3, 7)] + [
        _row("k8", sd, 0.51, 0.61) for sd in (3, 7)]
    pooled = {"k8": {"agg@50": {"diff": 0.01, "se": 0.002, "seeds": [3, 7],
                                "parts": [{"diff": 0.01, "se": 0.002, "seeds": [3]}] * 2}}}
    md = "\n".join(interests.seed_means(rows, pooled))
    assert "+1.00 ± 0.20 (+5.0 SE, seeds 3,7, pooled)" in md


def test_each_row_keeps_the_launch_that_ran_it(tmp_path):
    runs, tag = tmp_path / "runs", "t"
    for variant, seed, launch in (("sine", 42, "launch A"), ("k1", 42, "launch A"),
                                  ("sine", 7, "launch B")):
        run = runs / "d" / f"{variant}-{tag}-s{seed}"
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps({
            "label": variant, "variant": variant, "seconds": 1, "epochs": 1, "best_epoch": 1,
            "train_args": {"seed": seed}, "model_args": {"K": 1 if variant == "k1" else 4},
            "test_users": 10_000, "test": {"HR@50": 0.5, "HR@100": 0.6}, "command": "run",
            "git_commit": "0" * 40, "machine": {}, "finished": "now"}))
        logs = runs / "_logs" / tag
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"d-{variant}-s{seed}.launch").write_text(launch)
    found, _ = interests.collect(runs, tag)
    assert sorted((r["variant"], r["seed"], r["launch"]) for r in found["d"]) == [
        ("k1", 42, "launch A"), ("sine", 7, "launch B"), ("sine", 42, "launch A")]
    path = tmp_path / "accuracy-interests-t.json"
    path.write_text(json.dumps({"meta": {"command": "launch B", "earlier_commands": ["launch A"]},
                                "datasets": {"d": [{**_row("sine", 3, 0.5, 0.6),
                                                    "launch": "launch C"}]}}))
    # the kept seed-3 row names its own launch; the file's other launches own no kept row
    assert interests.keep_earlier(found, path)[1] == ["launch C"]
    path.write_text(json.dumps({"meta": {"command": "launch B", "earlier_commands": ["launch A"]},
                                "datasets": {"d": [_row("sine", 3, 0.5, 0.6)]}}))
    assert interests.keep_earlier(found, path)[1] == ["launch A", "launch B"]   # an older file


def test_the_device_reaches_every_run_and_cpu_adds_nothing(tmp_path):
    a = interests.argparse.Namespace(max_minutes=1.0, threads=1, runs_dir=tmp_path,
                                     tag="t", epochs=2, patience=3, data_dir=None, set=None,
                                     device="cuda")
    cmd = interests.job_command("ml-1m", "sasrec-dense", 7, a)
    assert cmd[cmd.index("--device") + 1] == "cuda"
    a.device = "cpu"
    assert "--device" not in interests.job_command("ml-1m", "sasrec-dense", 7, a)
