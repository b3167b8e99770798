"""Every benchmark's `--help` prints its options (argparse formats help lazily, so a stray `%`
in one is only found when someone asks)."""
import pkgutil
import subprocess
import sys

import pytest

import benchmarks

MODULES = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__)
                 if m.name not in ("common", "__init__"))


def test_there_are_benchmarks_to_check():
    assert {"serving", "encoder", "index", "quality"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_help_prints(name):
    src = (benchmarks.__path__[0] + f"/{name}.py")
    if "argparse" not in open(src).read():
        pytest.skip(f"benchmarks.{name} takes no options")
    r = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout
