import json

import pytest


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from model_export import data
    from model_export.training import TrainConfig, train
    from model_export.training.workflow import model_config

    out = tmp_path_factory.mktemp("partition")
    ds = data.load("synthetic", seed=5)                # the benchmark reloads it from the seed
    train(ds, model_config(ds, D=16, K=3, L=8),
          TrainConfig(batch_size=256, max_epochs=1, lr=3e-3, seed=5, threads=1), out / "run",
          progress=False)
    return out / "run" / "best.pt"


def test_rows_diagnostics_and_notes_are_written_and_a_rerun_replaces_its_row(checkpoint, tmp_path):
    from benchmarks.partition import main

    args = ["--run", f"synthetic={checkpoint}", "--out", str(tmp_path), "--tag", "t",
            "--threads", "1", "--note", "trained for one epoch"]
    main(args)
    main(args)
    payload = json.loads((tmp_path / "interests-partition-t.json").read_text())
    assert len(payload["runs"]) == 1 and payload["notes"] == ["trained for one epoch"]
    run = payload["runs"][0]
    assert set(run["rows"]) == {"aggregate", *(f"{w}/{m}" for w in ("sine", "partition")
                                               for m in ("max", "weighted", "quota"))}
    for r in run["rows"].values():
        assert 0 <= r["HR@50"] <= r["HR@100"] <= 100 and r["se@50"] > 0
    # a paired mean over the same users is the difference of the two hit rates
    p = run["paired"]["partition/max - aggregate"]["@50"]
    assert p["diff"] == pytest.approx(run["rows"]["partition/max"]["HR@50"] - run["rows"]["aggregate"]["HR@50"])
    d = run["diagnostics"]
    assert d["K"] == 3 and 0 < d["within_user_nmi_partition"] <= 1
    assert -1 <= d["partition_cosine"] <= 1 and -1 <= d["interest_cosine"] <= 1
    md = (tmp_path / "interests-partition-t.md").read_text()
    assert "| synthetic | `run` | 3 |" in md and "- trained for one epoch" in md


def test_a_run_must_name_a_data_set_and_an_existing_checkpoint(tmp_path, capsys):
    from benchmarks.partition import main

    with pytest.raises(SystemExit):
        main(["--run", str(tmp_path / "best.pt"), "--out", str(tmp_path)])
    assert "expected DATASET=CHECKPOINT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--run", f"synthetic={tmp_path / 'none.pt'}", "--out", str(tmp_path)])
    assert "no checkpoint at" in capsys.readouterr().err
