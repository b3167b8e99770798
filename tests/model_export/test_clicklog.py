"""`sine export-clicks` against a real redis-server and real files: partitioned Parquet written
atomically, entries acknowledged only after, and a run killed between writing and acknowledging
that loses no click and writes none twice when run again."""
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from model_export import data
from model_export.clicklog import ClickLogError, export_clicks, read_clicks
from service.settings import Settings
from sine_cli.main import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def accepted(small_world, own_redis, serve):
    """240 clicks accepted by a real service (60 users x 4); returns their event ids."""
    s = Settings(bundle=str(small_world["root"]), redis_url=own_redis.url, watch_interval_s=0)
    ids = []
    with serve(s) as c:
        for n in range(240):
            r = c.post("/events", json={"user_id": f"u{n % 60}", "item_id": f"i{n % 37}"})
            assert r.status_code == 200
            ids.append(r.json()["event_id"])
    return ids


def rows(folder: Path) -> list[tuple]:
    return sorted(read_clicks(folder), key=lambda r: r[3])


def test_export_writes_partitions_and_acknowledges(accepted, own_redis, tmp_path):
    out = tmp_path / "clicks"
    res = export_clicks(own_redis.url, out, batch=100)
    assert res.read == 240 and res.written == 240 and res.skipped == 0 and res.taken_over == 0
    files = sorted(out.glob("date=*/hour=*/part-*.parquet"))
    assert files and len(files) == len(res.files)
    t = pq.read_table(files[0])
    assert t.column_names == ["user_id", "item_id", "timestamp", "event_id"]
    got = rows(out)
    assert sorted(r[3] for r in got) == sorted(accepted)
    assert {(r[0], r[1]) for r in got} == {(f"u{n % 60}", f"i{n % 37}") for n in range(240)}
    r = own_redis.client()
    assert r.xpending("sine:clicks", "sine-export")["pending"] == 0
    again = export_clicks(own_redis.url, out)                 # nothing new: nothing written
    assert again.read == 0 and again.written == 0 and len(rows(out)) == 240
    assert not list(out.rglob("*.tmp"))
    # the loader reads the folder as a data set
    ds = data.load(str(out))
    assert ds.n_users == 60 and ds.n_interactions == 240


def test_a_run_killed_between_write_and_ack_loses_and_doubles_nothing(accepted, own_redis,
                                                                       tmp_path):
    out = tmp_path / "clicks"
    crash = ("import os, sys\n"
             "from model_export import clicklog\n"
             "clicklog.Exporter.ack = lambda self, ids: os.kill(os.getpid(), 9)\n"
             f"clicklog.export_clicks({own_redis.url!r}, {str(out)!r}, batch=50)\n")
    p = subprocess.run([sys.executable, "-c", crash], cwd=ROOT, capture_output=True)
    assert p.returncode == -signal.SIGKILL                    # killed right after a file
    written = rows(out)
    assert 0 < len(written) <= 50                             # that file is on disk
    r = own_redis.client()
    assert r.xpending("sine:clicks", "sine-export")["pending"] == 50   # read, never acked
    res = export_clicks(own_redis.url, out, batch=50)
    assert res.taken_over == 50 and res.skipped == len(written)
    got = rows(out)
    assert len(got) == 240 and sorted(x[3] for x in got) == sorted(accepted)   # exactly
    assert r.xpending("sine:clicks", "sine-export")["pending"] == 0


def test_not_a_click_is_a_clean_error(own_redis, tmp_path, capsys):
    own_redis.client().xadd("sine:clicks", {"something": "else"})
    with pytest.raises(ClickLogError, match="is not a click"):
        export_clicks(own_redis.url, tmp_path / "c")
    rc = main(["export-clicks", "--redis-url", own_redis.url, "--out", str(tmp_path / "c")])
    assert rc == 2 and "is not a click" in capsys.readouterr().err
    with pytest.raises(ClickLogError, match="no such click log folder"):
        list(read_clicks(tmp_path / "nowhere"))


def test_the_command_reports_what_it_did(accepted, own_redis, tmp_path, capsys):
    assert main(["export-clicks", "--redis-url", own_redis.url, "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "read 240 entries" in out and "wrote 240 clicks" in out
