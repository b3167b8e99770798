"""`sine export-clicks` against a real redis-server and real files: partitioned Parquet written
atomically, entries acknowledged only after, and a run killed between writing and acknowledging
that loses no click and writes none twice when run again."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from model_export import data
from model_export.data import ClickLogError, read_clicks
from model_export.freshness.clicklog import export_clicks
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
             "from model_export.freshness import clicklog\n"
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


def test_a_bad_entry_is_set_aside_and_the_export_goes_on(own_redis, tmp_path, capsys):
    """The finding: one malformed entry stopped every later export while trimming went on."""
    r = own_redis.client()
    r.xadd("sine:clicks", {"user": "a", "item": "1", "ts": "1000", "event": "e1"})
    bad = r.xadd("sine:clicks", {"something": "else"})
    r.xadd("sine:clicks", {"user": "a", "item": "2", "ts": "nan-ish", "event": "e2"})
    r.xadd("sine:clicks", {"user": "b", "item": "3", "ts": "2000", "event": "e3"})
    out = tmp_path / "c"
    rc = main(["export-clicks", "--redis-url", own_redis.url, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0 and "2 entries are not clicks" in captured.err
    assert sorted((u, i) for u, i, _, _ in read_clicks(out)) == [("a", "1"), ("b", "3")]
    (rejected,) = (out / "rejected").glob("*.jsonl")
    lines = [json.loads(x) for x in rejected.read_text().splitlines()]
    assert [x["id"] for x in lines][0] == bad and lines[0]["fields"] == {"something": "else"}
    assert all("not a click" in x["why"] for x in lines)
    assert r.xpending("sine:clicks", "sine-export")["pending"] == 0    # acknowledged
    r.xadd("sine:clicks", {"user": "c", "item": "4", "ts": "3000", "event": "e4"})
    assert export_clicks(own_redis.url, out).written == 1            # later exports go on
    with pytest.raises(ClickLogError, match="no such click log folder"):
        list(read_clicks(tmp_path / "nowhere"))


def test_a_gap_is_detected_and_counted(own_redis, tmp_path, capsys):
    """Entries deleted past what the group had read (an XTRIM by hand, another tool): the
    export says how many, and exits 5."""
    r = own_redis.client()
    for k in range(20):
        r.xadd("sine:clicks", {"user": "a", "item": str(k), "ts": str(1000 + k), "event": f"e{k}"})
    out = tmp_path / "c"
    assert export_clicks(own_redis.url, out).written == 20
    for k in range(20, 50):
        r.xadd("sine:clicks", {"user": "a", "item": str(k), "ts": str(1000 + k), "event": f"e{k}"})
    r.xtrim("sine:clicks", maxlen=10, approximate=False)      # 20 unread entries deleted
    res = export_clicks(own_redis.url, out)
    assert res.written == 10 and res.gap == 20 and res.lost == 20
    for k in range(50, 53):
        r.xadd("sine:clicks", {"user": "a", "item": str(k), "ts": str(1000 + k), "event": f"e{k}"})
    assert main(["export-clicks", "--redis-url", own_redis.url, "--out", str(out)]) == 0
    capsys.readouterr()
    r.xtrim("sine:clicks", maxlen=0, approximate=False)
    r.xadd("sine:clicks", {"user": "a", "item": "x", "ts": "1", "event": "ex"})
    r.xdel("sine:clicks", r.xrange("sine:clicks")[-1][0])
    assert main(["export-clicks", "--redis-url", own_redis.url, "--out", str(out)]) == 5
    assert "deleted before the export read them" in capsys.readouterr().err


def test_a_live_exporters_entries_are_not_taken(own_redis, tmp_path):
    r = own_redis.client()
    for k in range(10):
        r.xadd("sine:clicks", {"user": "a", "item": str(k), "ts": str(1000 + k), "event": f"e{k}"})
    r.xgroup_create("sine:clicks", "sine-export", id="0")
    r.xreadgroup("sine-export", "other-pod", {"sine:clicks": ">"}, count=4)   # it is working
    res = export_clicks(own_redis.url, tmp_path / "c", consumer="me")
    assert res.written == 6 and res.taken_over == 0
    assert r.xpending("sine:clicks", "sine-export")["pending"] == 4         # still the other's
    res = export_clicks(own_redis.url, tmp_path / "c", consumer="me", claim_idle_s=0)
    assert res.written == 4 and res.taken_over == 4                         # idle: taken


def test_only_the_window_is_read_and_old_partitions_are_compacted(own_redis, tmp_path):
    from model_export.data import count_clicks, newest_click
    from model_export.freshness.clicklog import compact_partitions

    r = own_redis.client()
    hour = 3600 * 1000
    base = 1_700_000_000_000 - 1_700_000_000_000 % hour
    for k in range(60):              # 6 hours, 10 clicks each, in several files an hour
        ts = base + (k // 10) * hour + k                 # Redis's clock: the entry id
        r.xadd("sine:clicks", {"user": f"u{k % 3}", "item": str(k), "ts": str(ts),
                               "event": f"e{k}"}, id=f"{ts}-0")
    out = tmp_path / "c"
    export_clicks(own_redis.url, out, batch=4)
    assert len(list(out.rglob("*.parquet"))) > 6
    newest = newest_click(out)
    assert newest == (base + 5 * hour + 59) / 1000
    window = list(read_clicks(out, since=newest - 2 * 3600))     # hours 4 and 5
    assert sorted(int(i) for _, i, _, _ in window) == list(range(40, 60))
    compacted, dropped = compact_partitions(out, before=newest - 2 * 3600,
                                            drop_before=newest - 4 * 3600)
    assert (compacted, dropped) == (2, 1)            # hours 1-2 merged, hour 0 gone
    assert count_clicks(out) == 50
    assert sorted(int(i) for _, i, _, _ in read_clicks(out)) == list(range(10, 60))
    for d in sorted(out.glob("date=*/hour=*"))[:2]:
        assert [p.name for p in d.glob("*.parquet")] == ["part-compacted.parquet"]


def test_the_command_reports_what_it_did(accepted, own_redis, tmp_path, capsys):
    assert main(["export-clicks", "--redis-url", own_redis.url, "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "read 240 entries" in out and "wrote 240 clicks" in out


def test_a_clicks_time_is_redis_not_the_pods_clock(own_redis, tmp_path):
    """The finding (read): click times came from each pod's clock, so one pod a year ahead made
    `newest` a year ahead (refresh: "nothing new") and retention could delete real partitions."""
    from model_export.data import newest_click

    r = own_redis.client()
    now_ms = int(r.time()[0]) * 1000
    future = now_ms + 365 * 86_400_000
    sid = r.xadd("sine:clicks", {"user": "u", "item": "1", "ts": str(future), "event": "e1"})
    r.xadd("sine:clicks", {"user": "u", "item": "2", "ts": str(now_ms), "event": "e2"})
    out = tmp_path / "c"
    export_clicks(own_redis.url, out)
    newest = newest_click(out)
    assert abs(newest - now_ms / 1000) < 60                 # not a year ahead
    times = {i: t for _, i, t, _ in read_clicks(out)}
    assert times["1"] == int(sid.split("-")[0]) / 1000
    assert [p.name for p in out.glob("date=*")] == [time.strftime("date=%Y-%m-%d",
                                                                  time.gmtime(now_ms / 1000))]


def test_a_long_backlog_keeps_few_partitions_in_memory_and_writes_each_click_once(own_redis,
                                                                                   tmp_path,
                                                                                   monkeypatch):
    from model_export.freshness import clicklog

    monkeypatch.setattr(clicklog, "KNOWN_PARTITIONS", 2)
    r = own_redis.client()
    hour = 3600 * 1000
    base = 1_700_000_000_000 - 1_700_000_000_000 % hour
    for k in range(40):                  # 8 hours, 5 clicks each
        ts = base + (k // 5) * hour + k
        r.xadd("sine:clicks", {"user": "u", "item": str(k), "ts": str(ts), "event": f"e{k}"},
               id=f"{ts}-0")
    seen = []
    real = clicklog.Exporter.handle

    def spy(self, entries, res):
        real(self, entries, res)
        seen.append(len(self._known))
    monkeypatch.setattr(clicklog.Exporter, "handle", spy)
    res = export_clicks(own_redis.url, tmp_path / "c", batch=3)
    assert res.written == 40 and max(seen) <= 2
    # a second run over the same entries (as after a crash) writes nothing twice
    r.xgroup_setid("sine:clicks", "sine-export", id="0")
    again = export_clicks(own_redis.url, tmp_path / "c", batch=3)
    assert again.written == 0 and again.skipped == 40
    assert sorted(int(i) for _, i, _, _ in read_clicks(tmp_path / "c")) == list(range(40))
