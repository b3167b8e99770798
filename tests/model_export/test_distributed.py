"""`sine train` under torchrun: two CPU ranks (gloo) train the model one process trains, rank 0
alone checkpoints and reports, and a distributed run resumes."""
import json
import os
import subprocess
import sys

import pytest
import torch

ARGS = ["--dataset", "synthetic", "--K", "2", "--L", "8", "--D", "16", "--batch-size", "128",
        "--seed", "5", "--threads", "1", "--no-progress", "--patience", "5"]


def sine_train(out, *extra, ranks=1):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", str(ranks)] if ranks > 1 else [sys.executable])
    cmd = [*launcher, "-m", "sine_cli", "train", *ARGS, "--out", str(out), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    one = sine_train(base / "one", "--epochs", "1")
    two = sine_train(base / "two", "--epochs", "1", ranks=2)
    return {"base": base, "one": one, "two": two}


def test_two_ranks_train_what_one_process_trains(runs):
    a = torch.load(runs["base"] / "one" / "best.pt", weights_only=False)
    b = torch.load(runs["base"] / "two" / "best.pt", weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:            # the same samples per step; only float sums reorder
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-3, atol=1e-3)
    assert len(a["history"]) == len(b["history"]) == 1
    ha, hb = a["history"][0], b["history"][0]
    assert hb["loss"] == pytest.approx(ha["loss"], rel=1e-3)          # every rank's batches
    assert hb["valid_HR@10"] == pytest.approx(ha["valid_HR@10"], abs=0.01)


def test_rank_zero_alone_reports(runs):
    out = runs["base"] / "two"
    metrics = json.loads((out / "metrics.json").read_text())
    one = json.loads((runs["base"] / "one" / "metrics.json").read_text())
    assert metrics["metrics"]["test"]["SINE"]["HR@50"] == pytest.approx(
        one["metrics"]["test"]["SINE"]["HR@50"], abs=0.01)
    text = runs["two"].stdout + runs["two"].stderr
    assert text.count("epoch 1:") == 1 and text.count("report:") == 1     # not once per rank
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]


def test_a_distributed_run_resumes(runs):
    out = runs["base"] / "two"
    p = sine_train(out, "--epochs", "2", "--resume", str(out / "last.pt"), ranks=2)
    assert "resumed from" in p.stdout + p.stderr
    ck = torch.load(out / "last.pt", weights_only=False)
    assert [h["epoch"] for h in ck["history"]] == [1, 2]


def test_a_batch_that_does_not_split_is_refused(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sine_cli", "train", *ARGS, "--batch-size", "127", "--epochs", "1", "--out",
           str(tmp_path / "x")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "multiple of their number" in p.stderr


def test_a_rank_leaves_with_its_code_and_its_output_flushed():
    # os._exit drops what sits in Python's buffers: a piped stdout is block-buffered
    code = ("from model_export.training.distributed import leave; import sys; "
            "print('report: written', end=''); print('warned', file=sys.stderr, end=''); leave(3)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=env)
    assert (p.returncode, p.stdout, p.stderr) == (3, "report: written", "warned")
