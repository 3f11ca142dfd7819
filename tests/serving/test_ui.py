"""The care team's pages in a real browser (Playwright driving Debian's chromium) against
a real twin service on loopback, its people made with ``twincast users create``.

Screenshots of each page go to ``build/test-artifacts/ui/`` (wide and narrow)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from tests.conftest import ROOT
from tests.serving.conftest import start_server
from tests.serving.test_service import api_events, history

SHOTS = Path(os.environ.get("TWINCAST_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts")) / "ui"
PASSWORD = "correct horse battery"
N_TWINS = 40
FIRST_ID = 5_100_000
OLD_TWIN = FIRST_ID + 999  # last seen years ago: its forecasts have expired


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing under CI=true (.ci/run installs it)")
        pytest.skip("chromium is not installed")
    return path


def cli(server, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TWINCAST_HOME": str(server.home),
           "TWINCAST_DATABASE_URL": server.db_url, "TWINCAST_MLFLOW_URI": server.tracking_uri,
           "MLFLOW_DISABLE_TELEMETRY": "true", "BENTOML_DO_NOT_TRACK": "true"}
    return subprocess.run([str(Path(sys.executable).parent / "twincast"), *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=120)


def recent(frame: pd.DataFrame, days_ago: int) -> pd.DataFrame:
    """The history moved in time to end ``days_ago`` days before now."""
    out = frame.copy()
    end = pd.Timestamp.now(tz="UTC").tz_localize(None) - pd.Timedelta(days=days_ago)
    out["time"] = out["time"] + (end - out["time"].max())
    return out


@pytest.fixture(scope="module")
def ui(trained, small_cohort, mlflow_home, tmp_path_factory):
    chromium = chromium_path()
    with start_server("ui", tmp_path_factory, mlflow_home) as server:
        twins = [{"subject_id": FIRST_ID + k, "events": api_events(recent(
            history(small_cohort, trained, k), 30 + k))} for k in range(N_TWINS)]
        twins.append({"subject_id": OLD_TWIN, "events": api_events(recent(
            history(small_cohort, trained, N_TWINS), 5 * 365))})  # not seen for 5 years
        with server.client() as c:
            r = c.post("/v1/twins:bulk", json={"twins": twins})
            assert r.status_code == 200, r.text
        for name, role in (("nurse", "clinical"), ("audra", "auditor"), ("gone", "clinical"),
                           ("locked", "clinical")):
            done = cli(server, "users", "create", "--name", name, "--role", role,
                       "--password-stdin", stdin=PASSWORD + "\n")
            assert done.returncode == 0, done.stdout + done.stderr
        short = cli(server, "users", "create", "--name", "weak", "--role", "clinical",
                    "--password-stdin", stdin="short\n")
        assert short.returncode == 2 and "at least 12 characters" in short.stderr
        from playwright.sync_api import sync_playwright

        SHOTS.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium,
                                        args=["--no-sandbox", "--disable-gpu"])
            server.browser = browser
            server.requested = []
            try:
                yield server
            finally:
                browser.close()
        elsewhere = [u for u in server.requested if not u.startswith(server.url + "/")]
        assert not elsewhere, elsewhere[:5]
        assert any(u.endswith("/ui/static/ui.css") for u in server.requested)


def page_for(ui, width: int = 1280):
    ctx = ui.browser.new_context(viewport={"width": width, "height": 900}, bypass_csp=True)
    page = ctx.new_page()
    # nothing a page loads comes from anywhere but the service itself
    page.on("request", lambda r: ui.requested.append(r.url))
    return page


def sign_in(ui, name: str = "nurse", password: str = PASSWORD, width: int = 1280,
            start: str = "/ui/population"):
    page = page_for(ui, width)
    page.goto(ui.url + start)
    assert "/ui/login" in page.url  # not signed in: sent to the sign-in page
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()
    return page


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def axe_check(page, name: str) -> None:
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page)
    bad = [(v["id"], v["impact"], len(v["nodes"]), v["help"])
           for v in results.response["violations"] if v["impact"] in ("serious", "critical")]
    assert not bad, f"{name}: {bad}"


def api(ui, role: str = "auditor"):
    return ui.client(role)


def test_sign_in_then_the_population_in_the_api_order(ui):
    page = sign_in(ui)
    shot(page, "population-1280")
    assert page.url.endswith("/ui/population"), page.content()[:3000]
    rows = page.locator("#population tbody tr[data-subject]")
    shown = [int(x) for x in rows.evaluate_all("rs => rs.map(r => r.dataset.subject)")]
    with api(ui) as c:
        listed = c.get("/v1/twins", params={"horizon_days": 730}).json()
    assert shown == [t["subject_id"] for t in listed["items"]] and len(shown) >= N_TWINS // 2
    assert OLD_TWIN not in shown  # expired: never ranked
    risks = [t["risk"] for t in listed["items"]]
    assert risks == sorted(risks, reverse=True)
    first = listed["items"][0]
    text = rows.first.inner_text()
    assert f"{first['risk']:.1%}" in text
    assert f"as of {first['as_of'][:10]}, for {first['as_of'][:10]} to " \
           f"{first['horizon_ends'][:10]}" in text
    axe_check(page, "population")
    shot(page, "population-1280")
    narrow = sign_in(ui, width=390)
    shot(narrow, "population-390")
    axe_check(narrow, "population narrow")
    # the narrow page scrolls its table, not the whole page
    assert narrow.evaluate("document.documentElement.scrollWidth") <= 400
    # the person, not a key, is in the access log for every twin listed
    with api(ui) as c:
        log = c.get("/v1/access-log", params={"limit": 500}).json()
    seen = {e["subject_id"] for e in log if e["key_name"] == "nurse"
            and e["action"] == "ui_population"}
    assert set(shown) <= seen
    # the other orders and filters give what the API gives
    page.goto(ui.url + "/ui/population?sort=rise&min_risk=1&horizon=365")
    with api(ui) as c:
        rise = c.get("/v1/twins", params={"horizon_days": 365, "sort": "rise",
                                          "min_risk": 0.01}).json()
    got = [int(x) for x in page.locator("#population tbody tr[data-subject]").evaluate_all(
        "rs => rs.map(r => r.dataset.subject)")]
    assert got == [t["subject_id"] for t in rise["items"]]


def test_a_twin_page_draws_its_whole_forecast_history(ui):
    sid = FIRST_ID + 3
    with ui.client() as c:  # a few more forecasts: events a month apart
        last = pd.Timestamp(c.get(f"/v1/twins/{sid}").json()["last_event_time"][:19])
        for k in range(1, 4):
            t = (last + pd.Timedelta(days=7 * k)).isoformat() + "Z"
            r = c.post(f"/v1/twins/{sid}/events", json={"events": [
                {"time": t, "code": "LAB//EGFR", "numeric_value": 40.0 - k}]})
            assert r.status_code == 200, r.text
    page = sign_in(ui, start=f"/ui/twins/{sid}")
    assert page.url.endswith(f"/ui/twins/{sid}")
    with api(ui) as c:
        hist = c.get(f"/v1/twins/{sid}/forecasts", params={"limit": 500}).json()
        model = c.get("/v1/model").json()
    ok = [f for f in hist["items"] if f["status"] == "ok"]
    for h in model["horizons_days"]:
        assert page.locator(f"#risk-history .pt.h{h}").count() == len(ok) == hist["total"]
    current = hist["items"][0]
    assert f"{current['risks']['730d']:.1%}" in page.locator("#current-risks").inner_text()
    egfr = page.locator("figure", has=page.locator("svg[aria-labelledby]")).filter(
        has_text="LAB//EGFR")
    assert egfr.count() >= 1
    assert page.locator("#contributions li").count() >= 1
    assert page.locator("#contributions h4").count() == len(model["horizons_days"])
    if current["trajectories"]:
        table = page.locator("#trajectories").inner_text()
        assert "Forecasts, not measurements" in table and "LAB//EGFR" in table
    # the chart's text alternative: title and description name what it shows
    desc = page.locator("#risk-history desc").text_content()
    assert f"{len(ok)} forecasts" in desc
    assert page.get_by_role("link", name="audit chain").count() == 0  # clinical: no audit
    axe_check(page, "twin")
    shot(page, "twin-1280")
    narrow = sign_in(ui, width=390, start=f"/ui/twins/{sid}")
    assert narrow.evaluate("document.documentElement.scrollWidth") <= 400
    axe_check(narrow, "twin narrow")
    shot(narrow, "twin-390")
    with api(ui) as c:
        log = c.get("/v1/access-log", params={"subject_id": sid, "limit": 50}).json()
    assert any(e["key_name"] == "nurse" and e["action"] == "ui_twin" for e in log)


def low_risk_twin(ui, threshold: float) -> int:
    with api(ui) as c:
        items = c.get("/v1/twins", params={"horizon_days": 730, "limit": 200}).json()["items"]
    low = [t for t in items if t["risk"] < threshold / 2 and not t["open_alert_id"]]
    assert low, "no twin far below the threshold"
    return low[-1]["subject_id"]


def test_an_event_raises_the_risk_and_an_alert_then_it_is_acknowledged(ui):
    sid = low_risk_twin(ui, 0.30)
    page = sign_in(ui, start=f"/ui/twins/{sid}")
    assert "Alert" not in page.locator("#alerts-h ~ ul").inner_text()
    with ui.client() as c:
        last = pd.Timestamp(c.get(f"/v1/twins/{sid}").json()["last_event_time"][:19])
        r = c.post(f"/v1/twins/{sid}/events", json={"events": [
            {"time": (last + pd.Timedelta(days=2 * k)).isoformat() + "Z",
             "code": "LAB//EGFR", "numeric_value": v} for k, v in ((1, 9.0), (2, 7.0),
                                                                    (3, 6.0))]})
        assert r.status_code == 200, r.text
        risk = r.json()["forecast"]["risks"]["730d"]
    assert risk >= 0.30, f"a falling eGFR gave only {risk:.3f}"
    page.reload()
    assert f"{risk:.1%}" in page.locator("#current-risks").inner_text()
    assert page.locator("ul.alerts li.alert", has_text="within 730 days crossed 30%").count() == 1
    assert page.locator("#current-risks .badge.alert").count() >= 1
    shot(page, "twin-alert")
    page.goto(ui.url + "/ui/alerts")
    row = page.locator(f"#alerts tr[data-subject='{sid}']").first
    alert_id = int(row.get_attribute("data-alert"))
    axe_check(page, "alerts")
    shot(page, "alerts-open")
    row.get_by_label("Reason").fill("seen; nephrology referral booked")
    row.get_by_role("button", name="Acknowledge").click()
    page.wait_for_load_state()
    assert f"Alert {alert_id} acknowledged" in page.locator("#notice").inner_text()
    assert page.locator(f"#alerts tr[data-alert='{alert_id}']").count() == 0
    with api(ui) as c:
        done = c.get("/v1/alerts", params={"state": "acknowledged"}).json()["items"]
        log = c.get("/v1/access-log", params={"subject_id": sid, "limit": 50}).json()
    mine = [a for a in done if a["id"] == alert_id]
    assert mine and mine[0]["acknowledged_by"] == "nurse"
    assert mine[0]["reason"] == "seen; nephrology referral booked"
    assert any(e["action"] == "ui_acknowledge_alert" and e["key_name"] == "nurse"
               and e["user_id"] is not None for e in log)
    page.goto(ui.url + "/ui/alerts?kind=alert&state=acknowledged")
    shot(page, "alerts-acknowledged")


def test_wrong_password_disabled_account_and_wrong_role_are_refused(ui):
    page = page_for(ui)
    page.goto(ui.url + "/ui/login")
    page.get_by_label("User name").fill("nurse")
    page.get_by_label("Password").fill("not the password at all")
    page.get_by_role("button", name="Sign in").click()
    assert "Wrong name or password" in page.locator("#login-error").inner_text()
    axe_check(page, "sign-in")
    shot(page, "sign-in-refused")
    # a disabled account is out at once, its open session too
    gone = sign_in(ui, "gone")
    assert gone.url.endswith("/ui/population")
    done = cli(ui, "users", "disable", "--name", "gone")
    assert done.returncode == 0, done.stdout + done.stderr
    gone.reload()
    assert "/ui/login" in gone.url
    again = sign_in(ui, "gone")
    assert "/ui/login" in again.url and "Wrong name or password" in again.content()
    # a clinical user on an auditor page
    nurse = sign_in(ui)
    r = nurse.goto(ui.url + f"/ui/twins/{FIRST_ID}/audit")
    assert r.status == 403 and "may not read the audit trail" in nurse.content()
    shot(nurse, "refused-role")
    auditor = sign_in(ui, "audra", start=f"/ui/twins/{FIRST_ID}")
    auditor.get_by_role("link", name="audit chain").click()
    auditor.wait_for_load_state()
    assert "Every link holds." in auditor.locator("#audit-verdict").inner_text()
    axe_check(auditor, "audit")
    shot(auditor, "audit")
    assert auditor.locator("form.ack").count() == 0  # auditors read; they do not acknowledge
    # ... and the server refuses it when they try all the same (with a valid form token)
    with api(ui) as c:
        open_alert = c.get("/v1/alerts").json()["items"][0]["id"]
    token = auditor.locator("form.who input[name=csrf]").get_attribute("value")
    r = auditor.request.post(ui.url + f"/ui/alerts/{open_alert}/acknowledge",
                             form={"reason": "no", "csrf": token}, max_redirects=0)
    assert r.status == 403 and "may not write twins" in r.text()
    with api(ui) as c:
        assert open_alert in {a["id"] for a in c.get("/v1/alerts").json()["items"]}


def test_cookies_and_forms_are_guarded(ui):
    with httpx.Client(base_url=ui.url, follow_redirects=False) as c:
        form = c.get("/ui/login")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        r = c.post("/ui/login", data={"name": "nurse", "password": PASSWORD, "csrf": token,
                                      "next": "https://evil.example/x"})
        assert r.status_code == 303 and r.headers["location"] == "/ui/population"
        cookie = next(h for h in r.headers.get_list("set-cookie") if "twincast_session=" in h)
        for flag in ("HttpOnly", "SameSite=strict", "Path=/ui", "Max-Age="):
            assert flag.lower() in cookie.lower(), cookie
        assert "secure" not in cookie.lower()  # plain HTTP on loopback
        page = c.get("/ui/alerts")
        assert page.status_code == 200
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-store"
        # a form without the session's token is refused and changes nothing
        with api(ui) as a:
            target = a.get("/v1/alerts").json()["items"][0]["id"]
        r = c.post(f"/ui/alerts/{target}/acknowledge", data={"reason": "x", "csrf": "forged"})
        assert r.status_code == 403 and "did not come from this site" in r.text
        with api(ui) as a:
            assert target in {x["id"] for x in a.get("/v1/alerts").json()["items"]}
        # a sign-in form from elsewhere (no matching cookie) is refused
        with httpx.Client(base_url=ui.url) as other:
            r = other.post("/ui/login", data={"name": "nurse", "password": PASSWORD,
                                              "csrf": token})
            assert r.status_code == 403
        # hostile paths and queries answer pages, never a 500
        for path in ("/ui/twins/%00", "/ui/twins/99999999999999999999999", "/ui/twins/%C2%B2",
                     "/ui/twins/%D9%A1%D9%A2", "/ui/twins/%C2%B2/audit", "/ui/twins/123456789",
                     "/ui/population?horizon=abc&page=-4&min_risk=x&max_days=%C2%B2",
                     "/ui/alerts?kind=%27&state=%3Cscript%3E&done=%3Cb%3E",
                     f"/ui/twins/{FIRST_ID}/audit?forecast=%00",
                     "/ui/static/../../etc/passwd"):
            r = c.get(path)
            assert r.status_code in (200, 303, 403, 404), (path, r.status_code)
        # a reflected value is escaped
        r = c.get("/ui/login?next=/ui/%22%3E%3Cscript%3Ealert(1)%3C/script%3E")
        assert r.status_code == 200 and "<script>alert(1)" not in r.text
        # a NUL in the name is a wrong name, not a database error
        form = c.get("/ui/login")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        r = c.post("/ui/login", data={"name": "nurse\x00", "password": PASSWORD,
                                      "csrf": token})
        assert r.status_code == 401


def test_repeated_failed_sign_ins_are_throttled(ui):
    with httpx.Client(base_url=ui.url) as c:
        def attempt(password: str) -> int:
            token = re.search(r'name="csrf" value="([^"]+)"',
                              c.get("/ui/login").text).group(1)
            return c.post("/ui/login", data={"name": "locked", "password": password,
                                             "csrf": token}).status_code
        assert [attempt(f"wrong password {k}") for k in range(5)] == [401] * 5
        assert attempt(PASSWORD) == 429  # even the right one, for a while
    with api(ui) as c:
        log = c.get("/v1/access-log", params={"limit": 500}).json()
    assert sum(e["action"] == "ui_sign_in_failed" and e["key_name"] == "locked"
               for e in log) == 5


def test_an_expired_forecast_reads_as_expired(ui):
    page = sign_in(ui, start=f"/ui/twins/{OLD_TWIN}")
    items = page.locator("#current-risks li")
    assert items.count() >= 1
    for k in range(items.count()):
        text = items.nth(k).inner_text()
        assert "expired" in text and "not a current risk" in text
    shot(page, "twin-expired")
    page.goto(ui.url + "/ui/population?expired=1")
    row = page.locator(f"#population tr[data-subject='{OLD_TWIN}']")
    assert row.count() == 1 and "expired" in row.inner_text()
    shot(page, "population-expired")


def test_a_model_change_queues_its_crossings_for_review(ui, trained):
    """Another candidate family promoted: the refresh re-forecasts every twin; the twins
    it carries over a threshold are queued for review, and nobody is paged."""
    from training.registry import CHAMPION, model_name
    from training.tracking import Tracker

    with api(ui) as c:
        before = {h: {t["subject_id"]: t["risk"] for t in c.get(
            "/v1/twins", params={"horizon_days": h, "limit": 200}).json()["items"]}
            for h in (365, 730)}
        open_before = {a["id"] for a in c.get("/v1/alerts").json()["items"]}
        # a twin and horizon alerted before may be disarmed (hysteresis): left out
        alerted = {(a["subject_id"], a["horizon_days"]) for a in c.get(
            "/v1/alerts", params={"state": "all", "limit": 200}).json()["items"]}
    reg = Tracker(ui.tracking_uri).registry
    name = model_name("eskd")
    champ = reg.version_by_alias(name, CHAMPION)
    other = next(cand for fam, cand in trained.candidates.items() if fam != trained.best)
    mv = reg.register(name, other.model_uri, other.run_id, {"family": other.family})
    reg.promote(name, str(mv.version), actor="test", kind="manual",
                reason="another family", task_name="eskd")
    assert str(mv.version) != str(champ.version)
    with ui.client("admin") as c:
        assert c.post("/v1/admin/reload").status_code == 200
        deadline = time.monotonic() + 120
        while True:
            job = c.get("/v1/admin/refresh").json()
            if job and job["model_version"] == str(mv.version) and job["state"] == "done":
                break
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        after = {h: {t["subject_id"]: t["risk"] for t in c.get(
            "/v1/twins", params={"horizon_days": h, "limit": 200}).json()["items"]}
            for h in (365, 730)}
        queued = c.get("/v1/alerts", params={"kind": "review", "limit": 200}).json()["items"]
        open_after = {a["id"] for a in c.get("/v1/alerts").json()["items"]}
    thresholds = {365: 0.20, 730: 0.30}  # examples/tasks/eskd.yaml
    expected = {(sid, h) for h, risks in after.items() for sid, r in risks.items()
                if r >= thresholds[h] and before[h].get(sid, 1.0) < thresholds[h]}
    assert expected - alerted, "the other family carried no twin over a threshold"
    assert {(a["subject_id"], a["horizon_days"]) for a in queued} - alerted == \
        expected - alerted
    assert all(a["model_version"] == str(mv.version) for a in queued)
    assert open_after == open_before  # nobody paged
    page = sign_in(ui, start="/ui/alerts?kind=review")
    assert page.locator("#alerts tr[data-alert]").count() == len(queued)
    axe_check(page, "review queue")
    shot(page, "review-queue")
    sid = queued[0]["subject_id"]
    page.goto(ui.url + f"/ui/twins/{sid}")
    assert "Queued for review (model change)" in page.locator("ul.alerts").inner_text()
    assert page.locator("#risk-history .mark").count() >= 1  # the version change is marked
    shot(page, "twin-model-change")
