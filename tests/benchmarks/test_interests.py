import json

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
    assert rows["ia-lse"]["train_args"]["interest_loss"] == "logsumexp"
    assert rows["sine"]["train_args"]["interest_weight"] == 0.0
    md = (res / "accuracy-interests-t.md").read_text()
    assert md.count(" ± ") >= 2 * 6 and "[`ia-lse`]" in md


def test_a_standard_error_is_binomial():
    assert interests.se(0.5, 100) == pytest.approx(0.05)
    assert interests.se(0.0, 100) == 0.0
