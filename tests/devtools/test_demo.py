"""`sine demo` end to end on synthetic data: build, serve, answer, stop; then reuse the bundle."""
import pytest

from devtools.local import free_port
from sine_cli.main import main

pytestmark = pytest.mark.slow


def test_demo_builds_serves_and_reuses(tmp_path, capsys):
    args = ["demo", "--dataset", "synthetic", "--workdir", str(tmp_path), "--train-minutes",
            "0.1", "--no-wait"]
    assert main(args + ["--port", str(free_port())]) == 0
    out = capsys.readouterr().out
    assert "training SINE on synthetic" in out and "started redis-server" in out
    assert 'POST /recommend {"user_id": "0", "n": 10}' in out and "fallback None" in out
    assert out.count("item ") >= 10                # titles printed beside the ids
    assert "/docs" in out and "/metrics" in out
    assert (tmp_path / "bundles" / "current").exists()

    assert main(args + ["--port", str(free_port())]) == 0
    out = capsys.readouterr().out
    assert "reusing bundle" in out and "training SINE" not in out


def test_demo_with_an_unreachable_redis_is_a_clean_error(tmp_path, capsys):
    from index_builder import bundle
    rc = main(["demo", "--dataset", "synthetic", "--workdir", str(tmp_path), "--train-minutes",
               "0.1", "--no-wait", "--redis-url", f"redis://127.0.0.1:{free_port()}/0"])
    assert rc == 2 and "Redis at redis://127.0.0.1" in capsys.readouterr().err
    assert bundle.current_version(tmp_path / "bundles")      # the bundle was still kept
