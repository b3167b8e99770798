import subprocess
import sys

import pytest

from sine_cli.main import build_parser, main


def test_every_subcommand_has_help(capsys):
    for cmd, flag in (("train", "--data-dir"), ("evaluate", "--checkpoint"), ("export", "--opset"),
                      ("build-index", "--recall-floor")):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([cmd, "--help"])
        assert e.value.code == 0
        assert flag in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "sine_cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "evaluate" in out.stdout


def test_bad_data_is_a_clean_error_not_a_traceback(tmp_path, capsys):
    log = tmp_path / "clicks.csv"
    log.write_text("user,item\n1,2\n")
    assert main(["train", "--dataset", str(log), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "clicks.csv:1: missing column(s)" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists(), "nothing written for a failed run"


def test_sasrec_refuses_sines_options(tmp_path, capsys):
    rc = main(["train", "--dataset", "synthetic", "--arch", "sasrec", "--K", "4",
               "--out", str(tmp_path / "r")])
    assert rc == 2 and "--K: SINE's options" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, said", [
    (["--K", "9", "--L", "8"], "need 1 <= K <= L"),
    (["--interest-T", "0"], "interest_T must be > 0"),
    (["--cos-penalty", "-1"], "cos_penalty must be >= 0")])
def test_out_of_range_settings_are_clean_errors(tmp_path, capsys, flags, said):
    rc = main(["train", "--dataset", "synthetic", "--out", str(tmp_path / "r"), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and said in err and "Traceback" not in err


def test_train_flags_are_made_from_the_configs_fields():
    """Each option is declared once, on its config field: every such field has its flag, and a
    parsed flag reaches the config unchanged."""
    from model_export.configs import SASRecConfig, SINEConfig, TrainConfig, flag_of, options
    from sine_cli.commands.train import _train_config
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = {s for a in train._actions for s in a.option_strings}
    for cls in (TrainConfig, SINEConfig, SASRecConfig):
        for f in options(cls):
            if f.metadata["cli"]:
                assert flag_of(f) in flags, (cls.__name__, f.name)
            elif f.name != "seed":                   # --seed is the data's and training's
                assert flag_of(f) not in flags, (cls.__name__, f.name)
    a = parser.parse_args(["train", "--epochs", "7", "--targets", "dense", "--stride", "5",
                           "--cos-penalty", "0.25", "--prototype-refresh", "--new-rows-replay", "3"])
    cfg = _train_config(a)
    assert (cfg.max_epochs, cfg.targets, cfg.stride, cfg.cos_penalty, cfg.prototype_refresh,
            cfg.new_rows_replay) == (7, "dense", 5, 0.25, True, 3.0)
    untouched = _train_config(parser.parse_args(["train"]))
    assert untouched == TrainConfig(seed=untouched.seed)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--targets", "every"])      # choices come from the field


def test_help_shows_both_defaults_of_a_shared_model_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default 0; SASRec 2)" in out            # --blocks: SINE's 0, SASRec's 2
    assert "--seq-len N" in out


def test_config_bounds_are_checked_from_the_field():
    from model_export.configs import SINEConfig, TrainConfig
    with pytest.raises(ValueError, match="dropout must be < 1, got 1.0"):
        SINEConfig(n_items=10, dropout=1.0)
    with pytest.raises(ValueError, match="aggregation must be one of adaptive, mean, latest"):
        SINEConfig(n_items=10, aggregation="sum")
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        TrainConfig(batch_size=0)
    assert TrainConfig(stride=None).stride is None          # None: unset, never out of range


def test_missing_checkpoint_is_a_clean_error(tmp_path, capsys):
    rc = main(["evaluate", "--dataset", "synthetic", "--checkpoint", str(tmp_path / "nope.pt")])
    assert rc == 2 and "checkpoint not found" in capsys.readouterr().err


@pytest.mark.slow
def test_train_then_evaluate_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "synthetic", "--out", str(out), "--epochs", "1", "--D", "16",
               "--L", "10", "--K", "2", "--no-progress", "--threads", "2"])
    assert rc == 0
    assert {"best.pt", "last.pt", "report.md", "metrics.json", "curves.png"} <= {p.name for p in out.iterdir()}
    rc = main(["evaluate", "--dataset", "synthetic", "--checkpoint", str(out / "best.pt"),
               "--report-dir", str(tmp_path / "rep")])
    assert rc == 0 and (tmp_path / "rep" / "report.md").exists()
    assert "| SINE |" in capsys.readouterr().out
    # the same checkpoint against another data set is refused with a reason
    assert main(["evaluate", "--dataset", "synthetic", "--seed", "5", "--checkpoint",
                 str(out / "best.pt")]) == 2


@pytest.mark.slow
def test_train_sasrec_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "synthetic", "--arch", "sasrec", "--out", str(out),
               "--epochs", "1", "--D", "16", "--heads", "2", "--dropout", "0.1",
               "--no-progress", "--threads", "2"])
    assert rc == 0
    assert "| SASRec |" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert report.startswith("# SASRec on synthetic") and "2 heads, dropout 0.1" in report


def test_export_and_build_index_from_the_command_line(small_world, tmp_path, capsys):
    from index_builder import bundle
    ds_args = ["--dataset", "synthetic"]
    # the small world's checkpoint was trained on other synthetic data: refused, exit 2
    assert main(["export", *ds_args, "--checkpoint", str(small_world["checkpoint"]),
                 "--out", str(tmp_path / "e")]) == 2
    assert "vocabulary" in capsys.readouterr().err
    rc = main(["build-index", "--export", str(small_world["export"]), "--bundle-root",
               str(tmp_path / "root"), "--version", "cli"])
    assert rc == 0 and bundle.load(tmp_path / "root").version == "cli"
    rc = main(["build-index", "--export", str(small_world["export"]), "--bundle-root",
               str(tmp_path / "root"), "--factory", "IVF16,PQ2", "--search-param", "nprobe=1",
               "--recall-floor", "0.99"])
    assert rc == 2 and "below the floor" in capsys.readouterr().err
    assert bundle.current_version(tmp_path / "root") == "cli"


@pytest.mark.slow
def test_train_warm_started_from_a_bundle_on_data_plus_clicks(small_world, own_redis, tmp_path,
                                                              capsys):
    from model_export.freshness.clicklog import export_clicks
    from model_export.training import load_checkpoint
    r = own_redis.client()
    for n in range(40):                                  # clicks on a new item and known ones
        r.xadd("sine:clicks", {"user": f"c{n % 8}", "item": "brand-new" if n % 2 else str(n),
                               "ts": str(1_700_000_000_000 + n), "event": f"e{n}"})
    export_clicks(own_redis.url, tmp_path / "clicks")
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "synthetic", "--out", str(out), "--epochs", "1",
               "--no-progress", "--threads", "2", "--warm-start", str(small_world["root"]),
               "--clicks", str(tmp_path / "clicks")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "warm start from" in text and " new" in text
    ck = load_checkpoint(out / "best.pt")
    assert "brand-new" in ck["item_ids"] and ck["model_args"]["D"] == 32    # its shape kept
    assert main(["train", "--dataset", "synthetic", "--warm-start", str(small_world["root"]),
                 "--resume", str(out / "last.pt"), "--out", str(tmp_path / "x")]) == 2


def test_a_serving_only_install_lists_every_command_and_says_what_is_missing():
    """The serving image has no model_export and no torch: `sine serve` still parses, and the
    training commands say what they need instead of failing on import."""
    hide = ("import sys; sys.modules['model_export'] = None; sys.modules['torch'] = None; "
            "from sine_cli.main import main; sys.exit(main(sys.argv[1:]))")
    run = lambda *args: subprocess.run([sys.executable, "-c", hide, *args], capture_output=True,
                                       text=True)
    out = run("--help")
    assert out.returncode == 0 and "serve" in out.stdout and "train" in out.stdout, out.stderr
    out = run("serve", "--help")
    assert out.returncode == 0 and "--bundle" in out.stdout
    out = run("train", "--dataset", "synthetic")
    assert out.returncode == 2 and "needs model_export" in out.stderr, out.stderr
