"""Where a user's data lives in Redis, and what a click log entry holds: the contract between
the service (which writes them) and `sine export-clicks` (which reads them).

Without shards, the templates as written and one stream; with N shards, each key of user u
starts with the hash tag `{sK}:` (K = crc32(u) mod N), so the history, the event id and the
stream an event goes to hash to one Redis Cluster slot. Beside each stream, the hash
`<stream>:trim` counts the unexported entries a cap removed (`lost`, by the event script) and
how many of them an export has reported (`reported`).
"""
from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .settings import Settings

# the log's defaults: `Settings` and the offline tools read them from here
DEFAULT_STREAM = "sine:clicks"
DEFAULT_GROUP = "sine-export"
# a click log entry's fields: the user, the item, the service's time (ms), the event id (the
# client's, or one made for it; unique per user)
ENTRY_FIELDS = ("user", "item", "ts", "event")
TRIM_SUFFIX = ":trim"
LOST, REPORTED = "lost", "reported"


class Keys:
    """The key scheme of one configuration: history, event ids and the log's streams."""
    def __init__(self, settings: Settings):
        self.n = settings.shards
        self._history = settings.redis_key_template.format
        self._event = settings.event_key_template.format
        self._stream = settings.click_stream_key

    @classmethod
    def streams_of(cls, stream: str = DEFAULT_STREAM, shards: int = 0) -> list[str]:
        """Every stream of a click log kept under `stream` in `shards` hash-tag shards (what
        the exporter reads, without a service configuration)."""
        return [stream] if not shards else [cls._tag(k) + stream for k in range(shards)]

    @staticmethod
    def _tag(shard: int) -> str:
        return f"{{s{shard}}}:"

    def tag(self, user_id: str) -> str:
        return self._tag(zlib.crc32(user_id.encode()) % self.n) if self.n else ""

    def history(self, user_id: str) -> str:
        return self.tag(user_id) + self._history(user_id=user_id)

    def event(self, user_id: str, event_id: str) -> str:
        """The key remembering one of this user's event ids (ids are scoped by user). The user
        part has its `%` and `:` escaped, so no two (user, event id) pairs share a key (`a` +
        `b:c` and `a:b` + `c` would)."""
        user = user_id.replace("%", "%25").replace(":", "%3A")
        return self.tag(user_id) + self._event(user_id=user, event_id=event_id)

    def stream(self, user_id: str) -> str:
        return self.tag(user_id) + self._stream

    def streams(self) -> list[str]:
        """Every stream of the click log."""
        return self.streams_of(self._stream, self.n)

    @staticmethod
    def trim(stream: str) -> str:
        """The counters beside a stream (same hash tag, so the same slot)."""
        return stream + TRIM_SUFFIX
