import json
from types import SimpleNamespace

import pytest

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
    assert md.count("| Popularity (training counts) [`popularity") == 2
    assert "| Popularity (training counts) | popularity |" in md        # its top-50 lists
    beyond = row["beyond"]["popularity"]
    assert 0 < beyond["coverage@50"] < 1 and 0 < beyond["diversity@50"] <= 1
    # a row whose run folder is gone stays in the results file
    (runs / "synthetic" / "popularity-other" / "result.json").unlink()
    assert accuracy.main(["--dataset", "synthetic", "--merge-only", "--runs-dir", str(runs),
                          "--results-dir", str(res)]) == 0
    assert set(json.loads((res / "accuracy-synthetic.json").read_text())["rows"]) == {
        "popularity", "popularity-other"}


def test_a_setting_must_be_name_equals_value(capsys):
    with pytest.raises(SystemExit):
        accuracy.main(["--dataset", "synthetic", "--set", "K"])
    assert "NAME=VALUE" in capsys.readouterr().err
    assert accuracy._setting("tau=0.5") == ("tau", 0.5)
    assert accuracy._setting("K=8") == ("K", 8)
    assert accuracy._setting("literal=true") == ("literal", True)


@pytest.mark.slow
def test_sine_and_sasrec_rows_carry_per_interest_lists_and_diagnostics(tmp_path):
    runs, res = tmp_path / "runs", tmp_path / "results"
    assert accuracy.main(["--dataset", "synthetic", "--variants", "sine,sasrec", "--epochs", "1",
                          "--set", "D=16", "--batch-size", "256", "--threads", "2",
                          "--runs-dir", str(runs), "--results-dir", str(res),
                          "--no-progress"]) == 0
    rows = json.loads((res / "accuracy-synthetic.json").read_text())["rows"]
    sine, sasrec = rows["sine"], rows["sasrec"]
    assert sine["model_args"]["D"] == 16 and sasrec["model_args"]["arch"] == "sasrec"
    assert sine["label"].endswith(", D = 16")
    assert set(sine["beyond"]) == {"aggregate", "per_interest"}
    assert sine["diagnostics"]["K"] == 4 and "assignment_nmi" in sine["diagnostics"]
    assert "diagnostics" not in sasrec
    # one interest: per-interest retrieval is the aggregate one
    assert sasrec["test_per_interest_percent"] == sasrec["test_percent"]
    md = (res / "accuracy-synthetic.md").read_text()
    assert "Per-interest retrieval" in md and "Interest diagnostics" in md
    assert "| SASRec (2 blocks, single vector, same harness), D = 16 | per_interest |" not in md


def test_a_log_without_item_labels_reports_what_it_can(tmp_path):
    """The README recommends this check on one's own log, which has no genres or categories."""
    from model_export import data

    ds = data.synthetic(n_users=200, n_items=80, n_categories=5, seed=3)
    log = tmp_path / "my_log.csv"
    log.write_text("user_id,item_id,timestamp\n" + "".join(
        f"{u},{ds.item_ids[int(i)]},{t}\n" for u, s in zip(ds.user_ids, ds.sequences)
        for t, i in enumerate(s)))
    res = tmp_path / "results"
    assert accuracy.main(["--dataset", str(log), "--variants", "popularity", "--runs-dir",
                          str(tmp_path / "runs"), "--results-dir", str(res)]) == 0
    md = next(res.glob("accuracy-*.md")).read_text()
    row = [ln for ln in md.splitlines() if ln.startswith("| Popularity (training counts) | popularity |")]
    assert row and row[0].split("|")[5].strip() == "-"           # diversity: no labels


def test_resume_keeps_a_finished_run(tmp_path, capsys):
    """`--resume` on a run with a result.json keeps it: no training again, no file rewritten
    (a relaunched grid must not retrain, and so overwrite, the runs it already finished)."""
    runs, res = tmp_path / "runs", tmp_path / "results"
    args = ["--dataset", "synthetic", "--variants", "sine", "--epochs", "1", "--set", "D=16",
            "--batch-size", "256", "--threads", "2", "--runs-dir", str(runs),
            "--results-dir", str(res), "--no-progress", "--resume"]
    assert accuracy.main(args) == 0
    run = runs / "synthetic" / "sine"
    stamps = {f.name: f.stat().st_mtime_ns for f in run.iterdir()}
    first = json.loads((res / "accuracy-synthetic.json").read_text())["rows"]["sine"]
    capsys.readouterr()
    assert accuracy.main(args) == 0
    assert "finished before, its result.json kept" in capsys.readouterr().out
    assert {f.name: f.stat().st_mtime_ns for f in run.iterdir()} == stamps
    again = json.loads((res / "accuracy-synthetic.json").read_text())["rows"]["sine"]
    assert again["test_percent"] == first["test_percent"] and again["finished"] == first["finished"]


def test_a_sweep_knob_equal_to_the_data_sets_preset_is_named_as_a_repeat():
    # the model's config reads the data set's name and item count alone
    ds, beauty = (SimpleNamespace(name=n, n_items=40) for n in ("ml-1m", "amazon-beauty"))
    assert accuracy.sweep_repeats("sasrec-d02-dense", ds) == "sasrec-dense"     # preset 0.2
    assert accuracy.sweep_repeats("sasrec-d05-dense", ds) is None
    assert accuracy.sweep_repeats("sasrec-d05-dense", beauty) == "sasrec-dense"  # preset 0.5
    assert accuracy.sweep_repeats("sasrec-d02-dense", beauty) is None
    for other in ("sasrec-dense", "sasrec-lr2e3-dense", "sasrec-D256-dense", "sine-bb2-d02-dense"):
        assert accuracy.sweep_repeats(other, beauty) is None
