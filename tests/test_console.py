"""The console at /console/ in a real headless Chromium (Debian's `chromium`, driven by selenium through Debian's
`chromedriver`; `make install` installs both), on the session's LAP.

Every figure the page shows is read back from the page and compared with the Output API's answer for the same
key. Screenshots of each view go to $LAP_CONSOLE_SCREENSHOTS (`make screenshots` sets it to docs/console).
"""

from __future__ import annotations

import asyncio
import gzip
import os
import shutil
import uuid
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

import httpx
import orjson
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from lap.aws import open_client
from lap.process.coordinator import COORDINATOR
from lap.samples import EventFactory, envelope
from tests.support.api import get, key
from tests.support.traffic import envelopes, new_tenant, send, wait_for

SHOTS: list[Path] = []  # the folder of this session's screenshots, set by the browser fixture
EVENTS = 900
BAD_ENVELOPE = b'{"sensor": "https://example.edu/sensors/broken", "data": "not a list"}'


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.fail("Debian's chromium and chromium-driver are not installed: `make install` installs them")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900",
                "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # TZ: the page reads days and hours in the browser's zone; one that is not UTC, to see `tz` at work
    driver = webdriver.Chrome(service=Service(driver_path, env={**os.environ, "TZ": "Asia/Kolkata"}), options=options)
    driver.set_page_load_timeout(30)
    folder = Path(os.environ.get("LAP_CONSOLE_SCREENSHOTS") or tmp_path_factory.mktemp("console"))
    folder.mkdir(parents=True, exist_ok=True)
    SHOTS[:] = [folder]
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
async def console_data(lap_up, settings):
    """A tenant with a few days of events for two courses, and one refused envelope; all drained."""
    from lap.sinks.store import connect

    started = datetime.now(timezone.utc)
    tenant, sensor = new_tenant(lap_up)
    factory = EventFactory(seed=15, learners=30, courses=2, start=started - timedelta(days=6), days=6)
    events = factory.events(EVENTS)
    send(settings, sensor, envelopes(events))
    refused = httpx.post(f"{settings.api_url}/caliper", content=BAD_ENVELOPE, timeout=30,
                         headers={"Authorization": f"Bearer {sensor}", "Content-Type": "application/json"})
    assert refused.status_code == 400, refused.text
    conn = await connect(settings)
    try:
        await wait_for(conn, tenant, {"accepted": EVENTS, "archived": EVENTS, "indexed": EVENTS}, timeout=180, settings=settings)
    finally:
        await conn.close()
    other, _ = new_tenant(lap_up)
    course = events[0]["group"]["id"]
    return {"tenant": tenant, "started": started, "events": events, "course": course,
            "learner": events[0]["actor"]["id"], "reader": key(lap_up, tenant, "reader"),
            "admin": key(lap_up, tenant, "admin"), "sensor": sensor, "other_reader": key(lap_up, other, "reader")}


def console_url(settings) -> str:
    return f"{settings.api_url}/console/"


def wait(browser, condition, timeout: float = 30, message: str = ""):
    def safe(driver):
        try:
            return condition(driver)
        except StaleElementReferenceException:  # the page redrew the element: look again
            return False
    return WebDriverWait(browser, timeout, poll_frequency=0.25).until(safe, message)


def sign_in(browser, settings, token: str) -> None:
    browser.get(console_url(settings))
    browser.execute_script("sessionStorage.clear(); location.reload()")  # signed out, whoever was signed in
    field = wait(browser, lambda d: d.find_element(By.ID, "key") if d.find_element(By.ID, "key").is_displayed()
                 else None, message="no sign-in form")
    field.send_keys(token, Keys.ENTER)


def signed_in(browser, settings, token: str) -> str:
    sign_in(browser, settings, token)
    who = wait(browser, lambda d: d.find_element(By.ID, "who-text").text, message="not signed in")
    assert token not in browser.current_url
    return who


def open_view(browser, settings, fragment: str, ready: str, timeout: float = 30):
    browser.execute_script("document.getElementById('view').replaceChildren()")  # nothing left of the last view
    browser.get(console_url(settings) + "#" + fragment)
    return wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ready), timeout, f"{fragment}: no {ready}")


def shot(browser, name: str) -> None:
    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(1280, min(max(900, height + 40), 2400))
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(SHOTS[0] / f"{name}.png"))
    browser.set_window_size(1280, 900)


def number(text: str) -> int:
    return int(text.replace(",", "").strip() or 0)


def table_rows(browser, table_id: str) -> list[dict[str, str]]:
    """The rows of a table, as {header: cell text}."""
    table = browser.find_element(By.ID, table_id)
    heads = [th.text.rstrip(" ▲▼") for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    return [dict(zip(heads, (td.text for td in tr.find_elements(By.TAG_NAME, "td"))))
            for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")]


def hour_state(hour: dict) -> str:
    """What the page says of an hour: incomplete when anything is missing, lost or kept aside."""
    if hour["complete"]:
        return "complete"
    lost = sum(hour["missing"].values()) + hour["retention_lost"] + hour["dead_lettered"]
    return "incomplete" if lost else "in progress"


def browser_zone(browser) -> str:
    return browser.execute_script("return Intl.DateTimeFormat().resolvedOptions().timeZone")


def proof_window(data) -> tuple[str, str]:
    start = data["started"].replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    end = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    return start.isoformat().replace("+00:00", "Z"), end.isoformat().replace("+00:00", "Z")


def test_a_wrong_key_gets_a_clear_message_and_no_view(browser, settings, console_data):
    sign_in(browser, settings, "lap_not-a-real-key")
    error = wait(browser, lambda d: d.find_element(By.ID, "sign-in-error").text)
    assert "not accepted" in error and "reader or admin key" in error
    assert not browser.find_element(By.ID, "view").is_displayed()
    shot(browser, "sign-in")
    sign_in(browser, settings, console_data["sensor"])
    error = wait(browser, lambda d: "sensor key" in d.find_element(By.ID, "sign-in-error").text
                 and d.find_element(By.ID, "sign-in-error").text)
    assert "cannot read" in error
    assert browser.execute_script("return sessionStorage.length") == 0  # a refused key is not kept


def test_the_pages_show_the_apis_figures(browser, settings, console_data):
    reader = console_data["reader"]
    browser.get_log("browser")  # the refused sign-ins' 401s and 403s are expected: only this test's count
    assert signed_in(browser, settings, reader) == f"{console_data['tenant']} · reader"
    assert reader not in browser.current_url

    # pipeline: this tenant's accepted events of the last 15 minutes, each shard, each dependency
    open_view(browser, settings, "pipeline", "#shards tbody tr")
    api = get(settings, reader, "/pipeline", minutes=15).json()
    assert number(browser.find_element(By.ID, "accepted-total").text) == \
        sum(m["accepted"] for m in api["minutes"]) == EVENTS
    assert [r["Shard"] for r in table_rows(browser, "shards")] == [s["shard_id"] for s in api["shards"]]
    chips = {c.get_attribute("data-component"): c.text for c in browser.find_elements(By.CSS_SELECTOR, "#components .chip")}
    assert chips == {name: f"{name}: {'ok' if c['ok'] else 'DOWN'}" for name, c in api["components"].items()}
    assert "Live" in browser.find_element(By.ID, "pipeline-status").text
    shot(browser, "pipeline")

    # proof: one row per hour of the browser's zone, each figure the API's
    start, end = proof_window(console_data)
    open_view(browser, settings, f"proof/{start}/{end}", "#hours tbody tr")
    zone = browser_zone(browser)
    hours = get(settings, reader, "/audit/hours", start=start, end=end, tz=zone).json()["hours"]
    rows = table_rows(browser, "hours")
    assert len(rows) == len(hours)
    for row, hour in zip(rows, hours):
        for column in ("Accepted", "Archived", "Aggregated", "Indexed", "Duplicates", "Quarantined"):
            assert number(row[column]) == hour[column.lower()], (column, row, hour)
        assert number(row["Missing"]) == sum(hour["missing"].values())
        assert row["State"] == hour_state(hour), (row, hour)
    assert sum(number(r["Accepted"]) for r in rows) == EVENTS
    assert sum(number(r["Quarantined"]) for r in rows) == 1
    shot(browser, "proof")

    # quarantine: the refused envelope, by sensor and reason, with its payload as sent
    open_view(browser, settings, "quarantine", "#refusals tbody tr")
    groups = table_rows(browser, "refusals")
    assert [(g["Sensor"], g["Status"], number(g["Requests"])) for g in groups] == \
        [("https://example.edu/sensors/broken", "400", 1)]
    browser.find_element(By.CSS_SELECTOR, "#refusals tbody tr button").click()
    payload = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "pre.payload").text)
    assert orjson.loads(payload) == orjson.loads(BAD_ENVELOPE)
    assert browser.find_element(By.CSS_SELECTOR, "ul.problems li").text  # the problem, with its JSON path
    shot(browser, "quarantine")

    # a course: its learners, sortable, the API's rows in the API's order; activity and heat map totals
    course = console_data["course"]
    open_view(browser, settings, f"course/{quote(course, safe='')}", "#course-learners tbody tr[data-learner]")
    wait(browser, lambda d: d.find_elements(By.ID, "heatmap-total"), message="no heat map")
    expected = get(settings, reader, "/course-learners", course=course, sort="-events", limit=50).json()["learners"]
    shown = table_rows(browser, "course-learners")
    assert [(r["Learner"], number(r["Events"])) for r in shown] == [(x["learner"], x["events"]) for x in expected]
    span = {"start": (datetime.now(timezone.utc) - timedelta(days=30)).isoformat(),
            "end": (datetime.now(timezone.utc) + timedelta(minutes=1)).isoformat()}
    heat = get(settings, reader, "/course-heatmap", course=course, tz=zone, **span).json()
    assert heat["time_zone"] == zone
    assert browser.find_element(By.ID, "heatmap-total").text == f"{sum(heat['hour_of_week']):,} events."
    cells = [int(c.get_attribute("data-count")) for c in browser.find_elements(By.CSS_SELECTOR, "svg.heatmap rect")]
    assert cells == heat["hour_of_week"]
    shot(browser, "course")
    browser.find_element(By.CSS_SELECTOR, "#course-learners th button[data-sort='events']").click()  # now ascending
    ascending = get(settings, reader, "/course-learners", course=course, sort="events", limit=50).json()["learners"]
    wait(browser, lambda d: [r.get("Learner") for r in table_rows(d, "course-learners")] ==
         [x["learner"] for x in ascending], message="sorting by events ascending did not show the API's order")

    # a learner: their courses
    learner = console_data["learner"]
    open_view(browser, settings, f"learner/{quote(learner, safe='')}", "#learner-courses tbody tr")
    summary = get(settings, reader, "/learner-summary", learner=learner).json()
    shown = table_rows(browser, "learner-courses")
    assert [(r["Course"], number(r["Events"])) for r in shown] == \
        [(c["course"] or "(no course)", c["events"]) for c in summary["courses"]]
    shot(browser, "learner")
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]


def test_another_tenants_reader_sees_none_of_it(browser, settings, console_data):
    signed_in(browser, settings, console_data["other_reader"])
    open_view(browser, settings, "pipeline", "#accepted-total")
    assert browser.find_element(By.ID, "accepted-total").text == "0"
    start, end = proof_window(console_data)
    open_view(browser, settings, f"proof/{start}/{end}", "#hours tbody tr")
    assert {number(r["Accepted"]) for r in table_rows(browser, "hours")} == {0}
    assert {number(r["Quarantined"]) for r in table_rows(browser, "hours")} == {0}
    open_view(browser, settings, "quarantine", "#no-refusals")
    open_view(browser, settings, "courses", "#courses tbody tr")
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#courses tbody tr").text == "None found.")
    open_view(browser, settings, f"course/{quote(console_data['course'], safe='')}", "#course-learners tbody tr")
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#course-learners tbody tr").text == "No learner found.")
    open_view(browser, settings, f"learner/{quote(console_data['learner'], safe='')}", "#view .error")
    assert "No events of this learner" in browser.find_element(By.CSS_SELECTOR, "#view .error").text


async def test_a_lost_archive_object_is_flagged_then_replayed_from_the_page(browser, settings, console_data, db,
                                                                            ray_driver):
    tenant = console_data["tenant"]
    lost_key = await db.fetchval("SELECT key FROM archive_objects WHERE tenant = $1 ORDER BY key LIMIT 1", tenant)
    async with AsyncExitStack() as stack:
        s3 = await open_client(stack, settings, "s3")
        reply = await s3.get_object(Bucket=settings.archive.bucket, Key=lost_key)
        async with reply["Body"] as body:
            lost = sorted(orjson.loads(line)["meta"]["event_id"] for line in gzip.decompress(await body.read()).splitlines())
        await s3.delete_object(Bucket=settings.archive.bucket, Key=lost_key)
    ray_driver.get(ray_driver.get_actor(COORDINATOR).sweep.remote(), timeout=120)  # its archive check, now

    # a reader sees the hour flagged, and its missing ids, but no replay button
    signed_in(browser, settings, console_data["reader"])
    start, end = proof_window(console_data)
    open_view(browser, settings, f"proof/{start}/{end}", "#hours tbody tr.incomplete")
    browser.find_element(By.CSS_SELECTOR, "#hours tbody tr.incomplete button").send_keys(Keys.ENTER)  # keyboard
    listed = wait(browser, lambda d: [li.text for li in d.find_elements(By.CSS_SELECTOR, "ul[data-stage='archive'] li")])
    assert listed == lost
    assert not browser.find_elements(By.ID, "replay-hour")

    # an admin replays it from the page, follows the job, and sees the hour turn complete
    signed_in(browser, settings, console_data["admin"])
    open_view(browser, settings, f"proof/{start}/{end}", "#hours tbody tr.incomplete")
    assert "1 of" in browser.find_element(By.ID, "proof-summary").text
    row = browser.find_element(By.CSS_SELECTOR, "#hours tbody tr.incomplete")
    hour = row.get_attribute("data-hour")
    row.find_element(By.TAG_NAME, "button").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "ul[data-stage='archive'] li"))
    shot(browser, "proof-incomplete")
    browser.find_element(By.ID, "replay-hour").click()
    wait(browser, lambda d: "complete" in d.find_element(By.CSS_SELECTOR, f"#hours tr[data-hour='{hour}']")
         .get_attribute("class").split(), timeout=180, message="the replayed hour did not turn complete")
    wait(browser, lambda d: "done" in d.find_element(By.ID, "replay-progress").text)
    assert "No hour of these" in browser.find_element(By.ID, "proof-summary").text or \
        not browser.find_elements(By.CSS_SELECTOR, "#hours tbody tr.incomplete")
    shot(browser, "proof-replayed")
    report = get(settings, console_data["reader"], "/audit/reconcile", start=start, end=end).json()
    assert report["complete"] is True and report["archived"] == EVENTS, report


async def test_an_erasure_shows_in_its_hours_and_in_the_tombstones(browser, settings, console_data, db):
    """A learner erased: the Erasures view lists the tombstone with the API's counts, each hour that held the
    learner's events says how many were erased, and is still complete, and a refused request that named the
    learner shows no payload."""
    reader, admin = console_data["reader"], console_data["admin"]
    learner = get(settings, reader, "/learners", limit=1).json()["learners"][0]["learner"]
    broken = dict(console_data["events"][0], id=f"urn:uuid:{uuid.uuid4()}", actor={"id": learner, "type": "Person"},
                  action="NotAnAction")
    refused = httpx.post(f"{settings.api_url}/caliper", timeout=30,
                         content=orjson.dumps(envelope([broken], sensor="https://example.edu/sensors/erased-learner")),
                         headers={"Authorization": f"Bearer {console_data['sensor']}",
                                  "Content-Type": "application/json"})
    assert refused.status_code in (400, 422), refused.text
    for _ in range(60):  # the quarantine's row is written a moment after the reply
        if await db.fetchval("SELECT count(*) FROM quarantined WHERE request_id = $1", refused.json()["request_id"]):
            break
        await asyncio.sleep(0.5)
    reply = httpx.delete(f"{settings.api_url}/v1/learners/{quote(learner, safe='')}", timeout=60,
                         headers={"Authorization": f"Bearer {admin}"})
    assert reply.status_code == 202, reply.text
    job = reply.json()["id"]
    for _ in range(240):
        erasure = get(settings, reader, f"/erasures/{job}").json()
        if erasure["status"] != "running":
            break
        await asyncio.sleep(0.5)
    assert erasure["status"] == "done" and erasure["counts"]["events"] > 0, erasure

    signed_in(browser, settings, reader)
    open_view(browser, settings, "erasures", "#erasures tbody tr")
    rows = table_rows(browser, "erasures")
    assert [(r["Erasure"], r["Status"], number(r["Events"])) for r in rows] == [(job, "done", erasure["counts"]["events"])]
    assert learner not in browser.find_element(By.ID, "view").text
    shot(browser, "erasures")

    start, end = proof_window(console_data)
    open_view(browser, settings, f"proof/{start}/{end}", "#hours tbody tr")
    hours = get(settings, reader, "/audit/hours", start=start, end=end, tz=browser_zone(browser)).json()["hours"]
    shown = table_rows(browser, "hours")
    assert [number(r["Erased"]) for r in shown] == [h["erased"] for h in hours]
    assert sum(h["erased"] for h in hours) == erasure["counts"]["events"]
    assert all(h["complete"] for h in hours if h["accepted"]), hours
    row = browser.find_element(By.CSS_SELECTOR, f"#hours tr[data-hour='{next(h['hour'] for h in hours if h['erased'])}']")
    row.find_element(By.TAG_NAME, "button").click()
    said = wait(browser, lambda d: d.find_element(By.ID, "hour-erased").text)
    assert "erased" in said and "not missing" in said

    open_view(browser, settings, "quarantine", "#refusals tbody tr")
    mine = next(r for r in browser.find_elements(By.CSS_SELECTOR, "#refusals tbody tr") if "erased-learner" in r.text)
    mine.find_element(By.TAG_NAME, "button").click()
    note = wait(browser, lambda d: next((p.text for p in d.find_elements(By.CSS_SELECTOR, "tr.sample p.note")
                                         if "no longer kept" in p.text), False))
    assert "erased" in note and not browser.find_elements(By.CSS_SELECTOR, "tr.sample pre.payload")
    assert learner not in browser.find_element(By.ID, "view").text
