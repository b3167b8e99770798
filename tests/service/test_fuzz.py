"""Schemathesis against the service's own OpenAPI, over real HTTP: no 5xx, ever, and every 4xx
is a problem+json that says what is wrong."""
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from service.schemas import BatchResponse, EventResponse, Recommendation
from service.settings import Settings

BODIES = {"/recommend": Recommendation, "/recommend/batch": BatchResponse,
          "/events": EventResponse}


def check(response, path: str) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code == 200 and path in BODIES:        # the fast path's JSON, checked
        BODIES[path].model_validate_json(response.content)    # against the declared schema
    if response.status_code >= 400:
        assert response.headers.get("content-type", [""])[0].startswith(
            "application/problem+json"), response.headers
        body = response.json()
        assert body["status"] == response.status_code and body["detail"].strip(), body


@pytest.mark.slow
def test_api_never_fails_and_explains_refusals(small_world, redis_server, serve):
    s = Settings(bundle=str(small_world["root"]), redis_url=redis_server.url, watch_interval_s=0,
                 admin_token="fuzz-token")
    with serve(s) as c:
        schema = schemathesis.openapi.from_url(str(c.base_url) + "/openapi.json")
        ops = [r.ok() for r in schema.get_all_operations()]
        assert {(o.method.upper(), o.path) for o in ops} >= {
            ("POST", "/recommend"), ("POST", "/recommend/batch"), ("POST", "/events"),
            ("POST", "/admin/reload")}
        calls = {"n": 0, "4xx": 0}
        neg = schemathesis.GenerationMode.NEGATIVE
        # GET endpoints take no input: nothing to break
        for op, mode in [(o, m) for o in ops for m in schemathesis.GenerationMode
                         if not (m == neg and o.method.upper() == "GET")]:
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=40, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case):
                r = case.call(base_url=str(c.base_url), timeout=10)
                calls["n"] += 1
                calls["4xx"] += 400 <= r.status_code < 500
                check(r, op.path)
            run()
        assert calls["n"] >= 200 and calls["4xx"] >= 50, calls
        assert c.get("/readyz").status_code == 200          # still healthy afterwards
