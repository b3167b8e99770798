"""The service's one configuration object. Built once by `create_app(settings)` and passed down.

Every field is read from an environment variable `SINE_<FIELD>` (upper case). The documentation
site's settings reference is generated from this class (`devtools.reference`);
`python -m service.settings` prints its table.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from index_builder.bundle import Merge, Mode, SineError

from .keys import DEFAULT_GROUP, DEFAULT_STREAM

ENV_PREFIX = "SINE_"
DEFAULT_CLUSTER_SHARDS = 16       # a few per master of a 3-master cluster, for balance


class Settings(BaseSettings):
    """Every option of the service, each read from `SINE_<FIELD>`."""
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid",
                                      populate_by_name=True)

    # bundle
    bundle: str = Field("runs/demo/bundles", description=(
        "A bundle root (holding a `current` pointer) or one bundle folder. With a root, the "
        "service serves the version `current` names."))
    watch_interval_s: float = Field(5.0, ge=0, description=(
        "How often to look at the bundle root's `current` pointer and hot-reload when it changes; "
        "0 turns watching off."))
    liveness_without_bundle_s: float = Field(600.0, ge=0, description=(
        "`/livez` answers 503 once no bundle has been served for this long since start-up "
        "(a root with no `current` yet, or versions that keep failing to load, retried with "
        "backoff meanwhile), so that the orchestrator restarts the pod; 0: never."))
    admin_token: SecretStr | None = Field(None, description=(
        "Bearer token for `POST /admin/reload` and the whole manifest from `GET /bundle`; unset "
        "disables reload (answered 401, as a wrong token is)."))
    metrics_redis_every_s: float = Field(1.0, ge=0, description=(
        "`/metrics` reads Redis's gauges (up, memory, the click log's length, lag and losses) at "
        "most this often; scrapes in between show the last reading, and concurrent scrapes "
        "share one. 0: every scrape reads Redis."))
    inspector: Literal["off", "admin", "open"] = Field("off", description=(
        "The inspector page, `GET /inspect`: a user's clicks, each interest's weight and items, "
        "and every merge's answer. `off`: no page (404); `admin`: its data route "
        "(`POST /admin/inspect`) needs the admin token; `open`: anyone may call it (a trusted "
        "network only: it shows a user's history)."))
    bundle_details_public: bool = Field(False, description=(
        "`GET /bundle` answers the whole manifest (commit, library versions, data set, offline "
        "metrics) to anyone; off: the version, item count and index factory, and the whole "
        "manifest only with the admin token."))
    search_params: dict[str, int] = Field(default_factory=dict, description=(
        "Override the bundle's faiss search knobs, as JSON, e.g. `{\"nprobe\": 64}`."))
    arms: dict[str, float] = Field(default_factory=dict, description=(
        "Candidate bundle versions under the bundle root, each with the share of users it "
        "answers (0 to 1, at most 1 in all), as JSON, e.g. `{\"20261207T1200Z-ab12cd34\": "
        "0.1}`; the other users get the served bundle (arm `control`). A user's arm is a hash of "
        "`arm_salt` and the user id: the same on every pod and after restarts. A candidate that "
        "cannot be loaded takes no traffic. `PUT /admin/arms` changes them live."))
    arm_salt: str = Field("sine", min_length=1, max_length=128, description=(
        "The salt of the users' arm hash; a new salt deals the users out afresh."))
    shadow: str | None = Field(None, description=(
        "A candidate bundle version that answers a sample of requests off the response path "
        "(never returned): its overlap with the served answer, latency and errors are recorded "
        "per arm (`sine_shadow_*`)."))
    shadow_rate: float = Field(0.1, ge=0, le=1, description=(
        "The share of `/recommend` requests the shadow also answers."))
    shadow_queue: int = Field(256, ge=1, description=(
        "Requests waiting for the shadow; beyond it, and whenever single requests hold half of "
        "`max_in_flight`, shadow work is dropped (counted) first."))

    # redis
    redis_url: str | None = Field(None, description=(
        "`redis://`, `rediss://` (TLS) or, with `redis_cluster`, any node of a Redis Cluster. "
        "Unset: no history store; every request is a cold start (`sine serve` only; the "
        "one-command demo starts its own Redis)."))
    redis_password: SecretStr | None = Field(None, description=(
        "Redis password, when it is not inside the URL. Never logged."))
    redis_cluster: bool = Field(False, description="Treat `redis_url` as a Redis Cluster node.")
    redis_shards: int | None = Field(None, ge=0, le=16384, description=(
        "Hash-tag shards of the key space. With N > 0 every key of user u (history, event ids) "
        "and the click log stream u's events go to start with the hash tag `{sK}:`, "
        "K = crc32(u) mod N, so one event's keys share a Redis Cluster slot and the click log is "
        "N streams (`{sK}:<click_stream_key>`). 0: keys exactly as templated, one stream. Unset: "
        "16 with `redis_cluster`, else 0. Changing it moves every key: reload the histories."))
    redis_key_template: str = Field("sine:history:{user_id}", description=(
        "Key of a user's history list (newest click first); must contain `{user_id}`."))
    redis_timeout_ms: float = Field(50.0, gt=0, description=(
        "Budget for a history read, connection included; past it the answer falls back."))
    redis_write_timeout_ms: float = Field(250.0, gt=0, description=(
        "Budget for recording an event: longer than reads, since a refused write is a lost "
        "click unless the caller retries."))
    redis_pool_size: int = Field(64, ge=1, description=(
        "Connections in the bounded pool; callers wait for a free one within the timeout."))
    redis_retry_after_ms: float = Field(500.0, ge=0, description=(
        "After a refused or broken Redis connection, requests skip Redis for this long (served "
        "as `history_unavailable`), then try again. Timeouts do not pause Redis."))
    on_history_unavailable: Literal["fallback", "error"] = Field("fallback", description=(
        "`fallback`: answer with popular items flagged `history_unavailable`; `error`: 503."))
    default_mode: Literal["bundle", Mode] = Field("bundle", description=(
        "The search a request that names no `mode` gets: `bundle`, the one its manifest names "
        "(`sine export --serving`, by default the best on validation; `aggregate` for bundles "
        "without one); or `aggregate` / `per_interest` for every bundle."))
    interest_merge: Literal["bundle", Merge] = Field("bundle", description=(
        "How `mode=per_interest` merges the K lists when a request names no `merge`: `bundle`, "
        "the manifest's merge (`max` where it names none); `max` (best raw score), `weighted` "
        "(score + log of the interest's Eq. 7 weight) or `quota` (each interest fills its "
        "weight's share of n)."))
    history_ttl_s: float = Field(90 * 86_400.0, ge=0, description=(
        "A user's history expires this long after their last event (or `sine load-histories`): "
        "a user gone that long is a cold start, and Redis holds no list for every id ever seen. "
        "0: histories never expire."))
    history_keep: int = Field(500, ge=1, description=(
        "Clicks kept per user by `POST /events` and `sine load-histories`. The encoder reads the "
        "newest `seq_len` of them; `exclude_seen` drops all kept ones (500: within 0.5 points of "
        "the offline HR@50 on ML-1M, about 640 bytes a user there, and 0.90 of the req/s of 20 "
        "at 32 connections; benchmarks/results/seen-filter.md, service-history-keep.md)."))

    # the click log
    click_log: bool = Field(True, description=(
        "Append every accepted event to a Redis Stream too, atomically with the history update: "
        "the durable log `sine export-clicks` and `sine refresh` train on."))
    click_stream_key: str = Field(DEFAULT_STREAM, description="Key of the click log's stream.")
    click_stream_max_len: int = Field(10_000_000, ge=0, description=(
        "Entries each stream of the click log keeps (per stream: with `redis_shards` N the log "
        "is N streams, so up to N times this in all); past it acknowledged entries are trimmed "
        "(see `click_stream_trim`). 0: no cap."))
    click_stream_max_age_s: float = Field(0.0, ge=0, description=(
        "Entries older than this (by Redis's clock, against the ids Redis assigns) are trimmed "
        "once acknowledged (see `click_stream_trim`); 0: no age limit."))
    click_stream_trim: Literal["exported", "cap"] = Field("exported", description=(
        "`exported`: trimming never removes an entry the export group has not acknowledged; "
        "the stream outgrows its cap while the export is behind (`sine_click_log_entries`), and "
        "without the group nothing is trimmed. `cap`: the cap wins; every unexported entry it "
        "removes is counted (`sine_click_log_lost_entries`, the export's report and exit "
        "status 5)."))
    click_stream_hard_max_len: int = Field(20_000_000, ge=0, description=(
        "The most entries a stream of the click log may ever hold, whatever the export does "
        "(or when no export group exists at all): at it, `click_stream_overflow` decides. "
        "Bounds Redis's memory. 0: no hard cap."))
    click_stream_overflow: Literal["refuse", "trim"] = Field("refuse", description=(
        "At the hard cap: `refuse` answers the event 503 (`click-log-full`) and writes nothing, "
        "counted in `sine_events_total{outcome=\"refused_full\"}`; `trim` keeps the newest "
        "entries and counts every unexported one removed (`sine_click_log_lost_entries`)."))
    click_export_group: str = Field(DEFAULT_GROUP, description=(
        "Consumer group of `sine export-clicks`; `/metrics` reports its lag."))
    event_key_template: str = Field("sine:event:{user_id}:{event_id}", description=(
        "Key that remembers a client's `event_id` so that a retried event is stored once; must "
        "contain `{user_id}` and `{event_id}`: ids are scoped by user, so one user's id never "
        "silences another's click."))
    events_token: SecretStr | None = Field(None, description=(
        "Bearer token `POST /events` requires; unset: any caller that can reach the service may "
        "record clicks for any user (restrict it with the chart's NetworkPolicy)."))
    read_token: SecretStr | None = Field(None, description=(
        "Bearer token `POST /recommend` and `/recommend/batch` require; unset: any caller that "
        "can reach the service may read recommendations, and from them infer a user's recent "
        "clicks (`exclude_seen`) and whether a user exists (`cold_start`)."))
    event_id_ttl_s: float = Field(86_400.0, gt=0, description=(
        "How long an `event_id` is remembered for retries."))

    # request limits
    max_n: int = Field(100, ge=1, description="Largest `n` a request may ask for.")
    max_batch_users: int = Field(256, ge=1, description="Most users in one `/recommend/batch` call.")
    max_user_id_length: int = Field(128, ge=1, description="Longest accepted user id (characters).")
    max_item_id_length: int = Field(128, ge=1, description="Longest accepted item id in `/events`.")
    max_in_flight: int = Field(256, ge=1, description=(
        "Single `/recommend` requests being answered at once, counted from when the body is in "
        "until the answer; beyond it they are refused at once with 429."))
    max_events_in_flight: int = Field(64, ge=1, description=(
        "`/events` being recorded at once, a pool of their own: a Redis write stall holds "
        "events (each up to `redis_write_timeout_ms`) and refuses the excess with 429, never "
        "the reads."))
    max_batch_in_flight: int = Field(256, ge=1, description=(
        "Users of bulk `/recommend/batch` calls (more than `interactive_batch_users` users) "
        "being answered at once (a batch counts one per user); beyond it a batch is refused "
        "with 429, and one larger than it runs only alone. A pool of its own, so that bulk "
        "callers never take what single requests need."))
    interactive_batch_users: int = Field(16, ge=0, description=(
        "A `/recommend/batch` of at most this many users (a ranking stage asking for a page) "
        "is admitted and scheduled as that many single requests; larger ones are bulk."))
    max_body_bytes: int = Field(16_384, ge=64, description=(
        "Largest request body of `/recommend`, `/events` and the other routes; a larger one is "
        "refused with 413 (from Content-Length, or once that many bytes have streamed in)."))
    max_batch_body_bytes: int = Field(1_048_576, ge=64, description=(
        "Largest request body of `/recommend/batch`."))
    header_timeout_s: float = Field(5.0, gt=0, description=(
        "A request's whole header section must arrive within this many seconds of the "
        "connection opening (or of its first byte on a kept-alive connection); past it the "
        "connection is answered 408 and closed."))
    body_timeout_s: float = Field(10.0, gt=0, description=(
        "A request's whole body must arrive within this many seconds of its headers; past it "
        "the answer is 408 and the connection is closed. A request takes no in-flight slot "
        "before its body is in."))
    max_header_bytes: int = Field(16_384, ge=1024, description=(
        "Largest header section (request line and every header); a larger one is answered 431 "
        "and the connection closed."))
    keep_alive_s: float = Field(5.0, gt=0, description=(
        "How long a connection with no request in progress stays open after its last answer, "
        "whatever bytes arrive that begin no request."))
    write_timeout_s: float = Field(10.0, gt=0, description=(
        "How long an answer may wait on a client that reads none of it (the socket's buffer "
        "full); past it the connection is aborted and its buffer freed."))
    max_connections: int = Field(1000, ge=1, description=(
        "Connections open at once; a further one is answered 503 and closed at once. Lowered "
        "at start to the process's file descriptor limit less the Redis pool and 64 more "
        "(Redis, the bundle watcher, the metrics)."))

    # compute
    providers: Literal["auto", "cpu", "cuda"] = Field("auto", description=(
        "ONNX Runtime providers. `auto`: CUDA when onnxruntime-gpu sees a GPU, else CPU."))
    allow_cpu_fallback: bool = Field(False, description=(
        "With `providers=cuda`: serve on CPU instead of failing readiness when CUDA is not active."))
    faiss_gpu: Literal["auto", "on", "off"] = Field("auto", description=(
        "Search on a GPU with faiss-gpu: `auto` when one is present, `on` fails start-up without."))
    intra_op_threads: int = Field(1, ge=0, description="ONNX Runtime intra-op threads (0 = ORT's default).")
    faiss_threads: int = Field(1, ge=1, description="OpenMP threads for faiss searches.")
    faiss_blas_vectors: int = Field(8, ge=1, description=(
        "Query vectors from which faiss's exact search scores a batch as one matrix product "
        "(BLAS) instead of one scan per vector, faster from 8 on over 3.4k items "
        "(benchmarks/results/search-paths.md). faiss's own threshold counts the queries' floats "
        "(128,000: 1,000 vectors of 128)."))
    direct_routes: bool = Field(True, description=(
        "Answer POST /recommend and GET /livez straight from ASGI behind the guard, past "
        "FastAPI's routing and dependency resolution: the same validation, answers and errors "
        "(benchmarks/results/service.md). Off: through FastAPI."))
    dense_search_max_items: int = Field(20_000, ge=0, description=(
        "An exact (Flat) index over at most this many items is searched on CPU as dense "
        "scores, one matrix product for the micro-batch with each user's seen items masked "
        "before the top n is taken: no search wider than n, no second search "
        "(benchmarks/results/service.md). Its temporary scores take 4 x items bytes a query "
        "vector. 0: always faiss."))
    batching: bool = Field(True, description=(
        "Micro-batch concurrent requests into one encoder run and one faiss search."))
    batch_max_size: int = Field(64, ge=1, description="Most requests in one micro-batch.")
    batch_max_bulk: int = Field(16, ge=1, description=(
        "Most users of bulk batch calls in one micro-batch, after the single requests: the "
        "encoder and the search run on the event loop, so a single request that arrives "
        "behind bulk work waits for at most this much of it."))
    batch_max_wait_ms: float = Field(0.0, ge=0, description=(
        "How long the first request of a batch waits for others. 0: batch only what queued up "
        "while the previous batch ran."))
    gc_freeze: bool = Field(True, description=(
        "After a bundle loads, move every object alive then out of the garbage collector's "
        "scans (`gc.freeze`): full collections of the loaded heap were what made p99 three "
        "times p50 under load. Off only to measure that."))

    # server
    host: str = Field("127.0.0.1", description="Address `sine serve` binds.")
    port: int = Field(8000, ge=0, le=65535, description="Port `sine serve` binds.")
    workers: int = Field(1, ge=1, le=64, description=(
        "uvicorn worker processes of `sine serve` on the one port, each with the whole app. "
        "With more than one, `/metrics` from any worker sums them all (prometheus_client's "
        "multiprocess mode) and the faiss index is shared through the page cache (`index_mmap`)."))
    metrics_dir: str | None = Field(None, description=(
        "With `workers` > 1: the folder for the workers' metric files, emptied at start. Unset: "
        "a new temporary folder."))
    index_mmap: bool = Field(True, description=(
        "Open the faiss index memory-mapped and read-only where its type allows (flat, scalar "
        "quantizer and IVF codes), so worker processes share its pages instead of holding a "
        "copy each; other types are read into memory."))
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level (JSON logs on stderr).")
    access_log: bool = Field(False, description="Log every request (costs throughput).")
    otel_traces_exporter: Literal["none", "otlp", "console"] = Field(
        "none", validation_alias="OTEL_TRACES_EXPORTER", description=(
            "OpenTelemetry's own variable, read as it is (no `SINE_` prefix): `otlp` sends one "
            "span per request, with a child per stage, over OTLP/HTTP to "
            "`OTEL_EXPORTER_OTLP_ENDPOINT` (the SDK reads the other `OTEL_*` variables); "
            "`console` prints them; `none` (the default here, unlike the SDK's): no traces."))
    shutdown_grace_s: float = Field(10.0, ge=0, description=(
        "On SIGTERM, how long in-flight requests may take to finish."))
    floor_endpoint: bool = Field(False, description=(
        "Serve `POST /floor`, a prebuilt answer of `/recommend`'s size, through FastAPI, for "
        "benchmarks; with `direct_routes` also `POST /floor/asgi`, the same answered as "
        "`/recommend` is, past FastAPI."))

    @field_validator("redis_key_template")
    @classmethod
    def _template_has_user(cls, v: str) -> str:
        if "{user_id}" not in v:
            raise ValueError("must contain {user_id}")
        return v

    @field_validator("event_key_template")
    @classmethod
    def _template_has_event(cls, v: str) -> str:
        if "{event_id}" not in v or "{user_id}" not in v:
            raise ValueError("must contain {user_id} and {event_id} (event ids are per user)")
        return v

    @model_validator(mode="after")
    def _log_needs_shards_on_a_cluster(self) -> Settings:
        if self.redis_cluster and self.click_log and self.redis_shards == 0:
            raise ValueError("click_log writes a user's history and its stream in one script, "
                             "which a Redis Cluster runs only on keys of one slot: set "
                             "redis_shards >= 1 (or leave it unset) with redis_cluster")
        return self

    @property
    def shards(self) -> int:
        """`redis_shards` resolved: 0 means no hash tags and one stream."""
        if self.redis_shards is not None:
            return self.redis_shards
        return DEFAULT_CLUSTER_SHARDS if self.redis_cluster else 0

    def to_env(self) -> dict[str, str]:
        """These settings as `SINE_*` variables that `Settings()` reads back equal."""
        import json

        env = {}
        for name in type(self).model_fields:
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, SecretStr):
                v = v.get_secret_value()
            env[env_name(name)] = (json.dumps(v) if isinstance(v, (dict, list, bool))
                                   else str(v))
        return env

    def redis_url_redacted(self) -> str | None:
        """The Redis URL with any password masked, for logs."""
        if not self.redis_url:
            return None
        from .redact import redact_url
        return redact_url(self.redis_url)


class SettingsError(SineError, ValueError):
    """Settings that do not validate; the message names each field and what is wrong."""


def settings_from(**overrides: Any) -> Settings:
    """`SINE_*` environment variables, with the non-None `overrides` on top."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise SettingsError(f"invalid settings: {msgs}") from None


def env_name(field: str) -> str:
    """The environment variable a field is read from: `SINE_<FIELD>`, or its alias (the
    OpenTelemetry variables keep their standard names)."""
    alias = Settings.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else ENV_PREFIX + field.upper()


def env_table() -> str:
    """The environment table of the settings reference, one row per Settings field."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, f in Settings.model_fields.items():
        if f.default_factory is not None:
            default = repr(f.default_factory())  # type: ignore[call-arg]
        elif f.default is None:
            default = "unset"
        else:
            default = f.default if not isinstance(f.default, bool) else str(f.default).lower()
        desc = (f.description or "").replace("|", "\\|")
        rows.append(f"| `{env_name(name)}` | `{default}` | {desc} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(env_table())
