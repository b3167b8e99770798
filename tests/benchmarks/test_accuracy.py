import json

from benchmarks import accuracy


def test_accuracy_benchmark_writes_rows_with_command_and_machine(tmp_path):
    runs, res = tmp_path / "runs", tmp_path / "results"
    args = ["--dataset", "synthetic", "--variants", "popularity", "--runs-dir", str(runs),
            "--results-dir", str(res)]
    assert accuracy.main(args) == 0
    assert accuracy.main(args + ["--tag", "other"]) == 0
    out = json.loads((res / "accuracy-synthetic.json").read_text())
    assert set(out["rows"]) == {"popularity", "popularity-other"}
    row = out["rows"]["popularity"]
    assert 0 < row["test_percent"]["HR@10"] < 100
    assert row["command"].startswith("python -m benchmarks.accuracy --dataset synthetic")
    assert row["machine"]["cpus"] >= 1 and row["git_commit"]
    md = (res / "accuracy-synthetic.md").read_text()
    assert md.count("| Popularity (training counts) |") == 2
