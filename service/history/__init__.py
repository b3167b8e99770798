"""User histories and the click log in Redis.

- `keys`: where each user's data lives, what a click log entry holds (shared with the exporter);
- `resp`: `ListReader`, the read path's own connection;
- `cluster`: a Redis Cluster's slot map, the service's own, driving per-master clients;
- `store`: `HistoryStore`, the reads, the event script and the click log's gauges;
- `bulk`: `sine load-histories`.
"""
from ..keys import ENTRY_FIELDS, Keys
from .bulk import bulk_load, load_histories
from .resp import ListReader
from .store import RECORD, ClickLogFull, HistoryError, HistoryStore, StreamInfo, redis_client

__all__ = ["ENTRY_FIELDS", "RECORD", "ClickLogFull", "HistoryError", "HistoryStore", "Keys", "ListReader",
           "StreamInfo", "bulk_load", "load_histories", "redis_client"]
