"""The inspector page in a real browser (Debian's chromium, driven by Playwright) against a real
uvicorn and redis-server: a user's clicks, K interest columns and the merged lists with the
items the data route names; an unknown user, a cold-start user and a Redis outage. Saves a
screenshot (to SINE_SCREENSHOT, else the test's folder)."""
import os
import shutil
from pathlib import Path

import pytest

from service.settings import Settings

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if CHROMIUM is None or sync_playwright is None:
        if os.environ.get("SINE_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium or playwright is missing and SINE_REQUIRE_BROWSER=1")
        pytest.skip("needs Debian's chromium and playwright (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def seed(redis, user, items):
    c = redis.client()
    c.delete(f"sine:history:{user}")
    if items:
        c.rpush(f"sine:history:{user}", *items)


def texts(page, selector):
    return [x.get_attribute("data-item") for x in page.query_selector_all(selector)]


def test_the_page_shows_what_the_service_retrieves(small_world, own_redis, serve, browser,
                                                   tmp_path):
    ds = small_world["ds"]
    hist = [ds.item_ids[int(i)] for i in ds.sequences[3][::-1]]
    seed(own_redis, "reader", hist)
    seed(own_redis, "stranger", ["not-an-item"])
    s = Settings(bundle=str(small_world["root"]), watch_interval_s=0, redis_url=own_redis.url,
                 inspector="open", redis_timeout_ms=200, redis_retry_after_ms=200)
    with serve(s) as c:
        want = c.post("/admin/inspect", json={"user_id": "reader", "n": 8}).json()
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"http://127.0.0.1:{c.port}/inspect")
        page.fill("#user", "reader")
        page.fill("#n", "8")
        page.click("#go")
        page.wait_for_selector("#interest-0 li")
        assert texts(page, "#history li") == [x["item_id"] for x in want["history"]]
        assert len(page.query_selector_all("#history li.window")) == \
            sum(x["in_window"] for x in want["history"])
        K = want["K"]
        assert len(page.query_selector_all("#interests .list")) == K
        for k in range(K):
            assert texts(page, f"#interest-{k} li") == \
                [x["item_id"] for x in want["interests"][k]["items"]]
            assert f"weight {want['interests'][k]['weight']:.3f}" in \
                page.inner_text(f"#interest-{k} h3")
        for how, items in want["merges"].items():
            assert texts(page, f"#answer-{how} li") == [x["item_id"] for x in items]
            chips = [int(x.inner_text()) for x in page.query_selector_all(f"#answer-{how} .chip")]
            assert chips == [x["interest"] for x in items]
        assert texts(page, "#answer-aggregate li") == [x["item_id"] for x in want["aggregate"]]
        assert want["history"][0]["title"] in page.inner_text("#history")
        assert page.is_hidden("#fallback") and errors == []
        shot = Path(os.environ.get("SINE_SCREENSHOT") or tmp_path / "inspector.png")
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000

        page.goto(f"http://127.0.0.1:{c.port}/inspect?user=nobody")     # from the address
        page.wait_for_selector("#answer-popular li")
        assert "No history for this user" in page.inner_text("#status")
        assert page.is_hidden("#personal")
        nobody = c.post("/admin/inspect", json={"user_id": "nobody", "n": 10}).json()
        assert texts(page, "#answer-popular li") == [x["item_id"] for x in nobody["popular"]]

        page.fill("#user", "stranger")
        page.click("#go")
        page.wait_for_selector("#status:has-text('vocabulary')")
        assert texts(page, "#history li.unknown") == ["not-an-item"]

        own_redis.stop()
        page.fill("#user", "reader")
        page.click("#go")
        page.wait_for_selector("#status:has-text('Redis could not be read')")
        assert "Redis could not be read" in page.inner_text("#status")
        assert errors == []


def test_the_page_reports_a_refused_token_and_a_bad_request(small_world, serve, browser):
    s = Settings(bundle=str(small_world["root"]), watch_interval_s=0, inspector="admin",
                 admin_token="right")
    with serve(s) as c:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{c.port}/inspect")
        page.fill("#user", "u")
        page.fill("#token", "wrong")
        page.click("#go")
        page.wait_for_selector("#status.error")
        assert page.inner_text("#status").startswith("401")
        assert page.is_hidden("#result")
        page.fill("#token", "right")
        page.fill("#user", "x" * 1000)                       # past SINE_MAX_USER_ID_LENGTH
        page.click("#go")
        page.wait_for_selector("#status:has-text('422')")
        assert "user_id:" in page.inner_text("#status")
