"""`sine export-clicks`: the click log moved from Redis into partitioned Parquet."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..common import log_args, log_settings


def add(sub: Any) -> None:
    from model_export.freshness.clicklog import CLAIM_IDLE_S, EXIT_LOST

    c = sub.add_parser("export-clicks", help="move the click log from Redis into Parquet",
                       description="Read the click log stream through a consumer group and write "
                       "partitioned Parquet (date=/hour=; user_id,item_id,timestamp,event_id), "
                       "each file atomically, acknowledging entries only once written. A rerun "
                       "after a crash takes over the pending entries and skips those written. "
                       f"Entries that are not clicks are set aside in <out>/rejected/. Exit "
                       f"{EXIT_LOST}: clicks were lost before they could be exported (removed by "
                       "the cap, or deleted), each counted.")
    log_args(c)
    c.add_argument("--out", type=Path, required=True, help="folder of the exported clicks")
    c.add_argument("--consumer", help="consumer name in the group (default export-<host>)")
    c.add_argument("--claim-idle-s", type=float, default=CLAIM_IDLE_S,
                   help="take over another consumer's unacknowledged entries once idle this "
                        f"long (default {CLAIM_IDLE_S:g}): a live exporter's are never taken")
    c.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from model_export.freshness.clicklog import EXIT_LOST, export_clicks
    from service.keys import Keys

    s = log_settings(a)
    res = export_clicks(s.redis_url, a.out, Keys.streams_of(s.click_stream_key, s.shards),
                        s.click_export_group, a.consumer,
                        s.redis_password.get_secret_value() if s.redis_password else None,
                        cluster=s.redis_cluster, claim_idle_s=a.claim_idle_s)
    print(f"read {res.read} entries ({res.taken_over} taken over from an unfinished run), wrote "
          f"{res.written} clicks in {len(res.files)} files, skipped {res.skipped} already "
          f"written, in {res.seconds:.1f} s -> {a.out}")
    if res.rejected:
        print(f"warning: {res.rejected} entries are not clicks; set aside in "
              f"{', '.join(res.rejected_files)}", file=sys.stderr)
    if res.lost:
        print(f"error: {res.lost} clicks were lost before they could be exported "
              f"({res.lost_to_cap} removed unexported by the cap, {res.gap} deleted before the "
              f"export read them, {res.vanished} deleted after it read them)", file=sys.stderr)
        return EXIT_LOST
    return 0
