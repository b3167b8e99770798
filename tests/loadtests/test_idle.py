import json
import subprocess
import sys
from pathlib import Path

from loadtests.idle import burn

ROOT = Path(__file__).resolve().parents[2]


def test_the_cpu_stand_in_spends_no_more_than_asked_and_lasts_the_wall_time():
    got = burn(0.02, 0.2)
    assert got["wall_s"] >= 0.2
    assert got["cpu_s"] <= 0.02 + 0.015              # at most a slice (and its sleep's cost) over


def test_the_cpu_stand_in_opens_no_socket_and_writes_its_cpu(tmp_path):
    out = tmp_path / "burn.json"
    # port 9 (discard) is closed here: a socket opened would fail and be counted as an error
    subprocess.run([sys.executable, "-m", "loadtests.idle", "--port", "9", "--seconds", "0.2",
                    "--burn-cpu-s", "0.01", "--out", str(out)], cwd=ROOT, check=True,
                   timeout=60)
    got = json.loads(out.read_text())
    assert set(got) == {"attacker"} and got["attacker"]["wall_s"] >= 0.2
