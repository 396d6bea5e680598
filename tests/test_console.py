"""The live console in headless Chromium: the page opens with the admin token, shows the app,
its channel and presence members, streams an event sent with the Pusher SDK, and sends a test
event from its own form. Needs Debian's chromium (.ci/run installs it) and Playwright for
Python (never `playwright install`: it drives /usr/bin/chromium)."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from wsclient import connect

from fastrelay.signatures import sign_channel

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "console-test-token-0123456789"


def chromium_or_skip() -> Any:
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run does it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright for Python is not installed (pip install playwright)")
    return sync_playwright


def status_of(url: str, headers: dict | None = None, data: bytes | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers or {}),
                                    timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_console_is_off_without_a_token_and_refuses_wrong_ones(fresh_relay: Any) -> None:
    off = fresh_relay()
    assert status_of(off.http_url + "/console") == 404
    on = fresh_relay({"FASTRELAY_ADMIN_TOKEN": TOKEN})
    assert status_of(on.http_url + "/console") == 401
    assert status_of(on.http_url + "/console?token=wrong") == 401
    assert status_of(on.http_url + "/console/api/state") == 401
    assert status_of(on.http_url + "/console/api/state",
                     {"X-Fastrelay-Admin-Token": TOKEN}) == 200
    assert status_of(on.http_url + "/console/api/state", {"Cookie": "fastrelay_console=forged"}) == 401
    assert status_of(on.http_url + "/console/api/send", {"Content-Type": "application/json"},
                     b'{"app_id":"100001","channel":"c","event":"e","data":"x"}') == 401


def test_console_in_chromium_shows_state_and_live_events(fresh_relay: Any, tmp_path: Path) -> None:
    sync_playwright = chromium_or_skip()
    relay = fresh_relay({"FASTRELAY_ADMIN_TOKEN": TOKEN})
    # some state to show: a public channel and a presence channel with a member
    a = connect(relay)
    a.subscribe("orders")
    b = connect(relay)
    cd = json.dumps({"user_id": "alice", "user_info": {"name": "Alice"}})
    b.subscribe("presence-room", auth=sign_channel(relay.key, relay.secret, b.socket_id, "presence-room", cd),
                channel_data=cd)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM,
                                     args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{relay.http_url}/console?token={TOKEN}")
            assert "token=" not in page.url  # dropped from the address bar
            page.wait_for_selector("#feed-status.live", timeout=10_000)
            page.wait_for_selector('tr[data-channel="orders"]', timeout=10_000)
            page.wait_for_selector("text=members: alice", timeout=10_000)
            # an event from a backend appears in the live stream
            relay.pusher().trigger("orders", "order.paid", {"id": 42})
            row = page.wait_for_selector('#events li[data-event="order.paid"]', timeout=10_000)
            assert "orders" in row.inner_text() and '"id":42' in row.inner_text().replace(" ", "")
            assert a.expect("order.paid", "orders")
            # the form sends a test event that subscribers receive
            page.fill("#send-channel", "orders")
            page.fill("#send-event", "console.test")
            page.fill("#send-data", '{"from": "console"}')
            page.click("#send-form button")
            page.wait_for_selector("#send-result:has-text('sent')", timeout=10_000)
            page.wait_for_selector('#events li[data-event="console.test"]', timeout=10_000)
            assert a.expect("console.test", "orders")["data"] == {"from": "console"}
            page.wait_for_timeout(2100)  # one state refresh, so the counters are current
            shot = tmp_path / "console.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"console screenshot: {shot}")
            # the cookie carries later visits (no token in the URL)
            page.goto(f"{relay.http_url}/console")
            page.wait_for_selector("#feed-status.live", timeout=10_000)
            relay.pusher().trigger("orders", "after.reload", "x")
            page.wait_for_selector('#events li[data-event="after.reload"]', timeout=10_000)
            assert errors == [], errors
        finally:
            browser.close()
    a.close()
    b.close()
