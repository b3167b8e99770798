"""Settings: env vars, validation, and the reference table generated from the class."""

import pytest
from pydantic import ValidationError

from service.settings import Settings, env_table


def test_env_vars_are_read_with_the_prefix(monkeypatch):
    monkeypatch.setenv("SINE_MAX_N", "7")
    monkeypatch.setenv("SINE_SEARCH_PARAMS", '{"nprobe": 32}')
    monkeypatch.setenv("SINE_BATCHING", "false")
    s = Settings()
    assert s.max_n == 7 and s.search_params == {"nprobe": 32} and s.batching is False


def test_invalid_values_are_refused():
    with pytest.raises(ValidationError, match="user_id"):
        Settings(redis_key_template="history:{user}")
    with pytest.raises(ValidationError):
        Settings(max_n=0)
    with pytest.raises(ValidationError):
        Settings(providers="tpu")
    with pytest.raises(ValidationError):
        Settings(no_such_option=1)


def test_secrets_stay_out_of_repr_and_logged_url():
    s = Settings(redis_url="rediss://default:hunter2@redis.example:6380/0",
                 admin_token="tok", redis_password="pw", events_token="evt")
    assert "hunter2" not in s.redis_url_redacted() and "***" in s.redis_url_redacted()
    assert "redis.example:6380" in s.redis_url_redacted()
    assert "tok" not in repr(s.admin_token) and "pw" not in repr(s.redis_password)
    assert "evt" not in repr(s)
    # redis-py also takes the password as a query parameter
    q = Settings(redis_url="redis://redis.example:6379/0?password=hunter2&socket_timeout=1")
    assert "hunter2" not in q.redis_url_redacted()
    assert "socket_timeout=1" in q.redis_url_redacted() and "password=***" in q.redis_url_redacted()


def test_event_ids_are_keyed_by_user():
    with pytest.raises(ValidationError, match="user_id"):
        Settings(event_key_template="sine:event:{event_id}")
    from service.history import Keys
    k = Keys(Settings())
    assert k.event("alice", "e1") != k.event("bob", "e1")


def test_env_table_has_a_row_per_setting():
    from service.settings import env_name
    rows = env_table().splitlines()[2:]
    assert len(rows) == len(Settings.model_fields)
    for row, name in zip(rows, Settings.model_fields, strict=True):
        assert row.startswith(f"| `{env_name(name)}` |")
        assert Settings.model_fields[name].description, f"{name} has no help text"



def test_settings_survive_the_trip_to_a_worker(monkeypatch):
    """`sine serve --workers N` hands its settings to new interpreters through SINE_* vars."""
    from service.settings import Settings

    s = Settings(workers=3, search_params={"nprobe": 8}, admin_token="t0k",
                 redis_url="redis://h:1/0", redis_cluster=True, batching=False,
                 batch_max_wait_ms=1.5, log_level="warning")
    for k in list(__import__("os").environ):
        if k.startswith("SINE_"):
            monkeypatch.delenv(k)
    for k, v in s.to_env().items():
        monkeypatch.setenv(k, v)
    again = Settings()
    assert again.model_dump() == s.model_dump()
    assert again.admin_token.get_secret_value() == "t0k"
