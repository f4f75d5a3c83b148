"""The console in headless chromium (Playwright) against a running worker with real data: a customer looked up
by an identity, an audience written, checked, previewed, saved and reaching the stream, an erasure filed and
followed; by keyboard, with API problems shown. Screenshots in tests/console/results/."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from kafka_helpers import produce
from procs import PipelineProc, stop_all

from pipeline.api.auth import ApiKey, entry_yaml, hash_key, new_key
from pipeline.resources import EXAMPLE_CONFIG_DIR
from pipeline.segments.explain import dates_text

CHROMIUM = "/usr/bin/chromium"
RESULTS = Path(__file__).with_name("results")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EMAIL, CRM, COOKIE = "Ada.Shopper@Example.com", "CRM-CONSOLE-1", "cookie-console-1"

pytestmark = [pytest.mark.integration, pytest.mark.browser,
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no {CHROMIUM} (make browsers)")]


@pytest.fixture
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e .[dev])")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def screenshot(page: Any, name: str, *texts: str) -> Path:
    """A PNG of the page, checked to be an image and taken while the page shows `texts`."""
    for text in texts:
        assert text in page.inner_text("main"), (text, page.inner_text("main")[:2000])
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, (path, len(data))
    return path


def test_the_console_looks_up_edits_an_audience_and_erases(registry: Any, kafka_bootstrap: str, start_worker: Any,
                                                           make_config: Any, tmp_path: Path, browser: Any) -> None:
    # Given a worker with API keys (an admin, and a support agent who may only read profiles) whose audience
    # definitions the console may write
    admin, agent = new_key(), new_key()
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n" + entry_yaml(ApiKey("steward", hash_key(admin), frozenset({"admin"})))
                    + entry_yaml(ApiKey("agent", hash_key(agent), frozenset({"profiles:read"}))))
    config = make_config((EXAMPLE_CONFIG_DIR / "segments.yaml").read_text())
    (config / "destinations.yaml").write_text(  # (no runner: the lookup shows where memberships are configured to go)
        "destinations:\n  - name: shoe-hook\n    kind: http\n    audiences: [shoe-lovers]\n"
        "    identities:\n      - {namespace: CRMID}\n    url: http://127.0.0.1:9/hook\n")
    worker = start_worker(config_dir=config, extra_env={"PIPELINE_API_KEYS_FILE": str(keys),
                                                        "PIPELINE_AUDIENCES_WRITABLE": "on"})
    # and a customer: a CRM record (e-mail, CRM id, gold), three shoe views and a login on the web (cookie)
    now = int(time.time() * 1000)
    produce(registry, kafka_bootstrap, "ingest.profiles", [{
        "recordId": "r1", "timestamp": now - 60_000, "dataset": "crm", "crmId": CRM, "email": EMAIL,
        "loyalty": {"tier": "gold", "points": 12000}}])
    views = [{"eventId": f"v{i}", "timestamp": now - 50_000 + i * 1000, "eventType": "productView",
              "dataset": "web-events", "identityMap": {"ECID": [{"id": COOKIE, "primary": True}]},
              "product": {"sku": f"S{i}", "category": "shoes", "price": 80.0}} for i in range(3)]
    login = {"eventId": "login", "timestamp": now - 40_000, "eventType": "login", "dataset": "web-events",
             "identityMap": {"ECID": [{"id": COOKIE}], "CRMID": [{"id": CRM}]}}
    produce(registry, kafka_bootstrap, "ingest.events", [*views, login])
    http = httpx.Client(base_url=worker.url, timeout=10, headers={"Authorization": f"Bearer {admin}"})
    deadline, profile = time.monotonic() + 90, {}
    while time.monotonic() < deadline:
        r = http.get("/profiles", params={"namespace": "Email", "id": EMAIL})
        profile = r.json() if r.status_code == 200 else {}
        if (set(profile.get("identities", {})) >= {"CRMID", "ECID", "Email"} and profile["event_count"] == 4
                and "shoe-lovers" in profile["memberships"]):
            break
        time.sleep(0.5)
    assert set(profile["identities"]) >= {"CRMID", "ECID", "Email"} and "shoe-lovers" in profile["memberships"], profile
    pid = profile["profile_id"]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    console = f"{worker.url}/console/"
    shots: list[Path] = []

    # When the support agent opens the console and types the key, by keyboard only
    page.goto(console)
    page.focus("#api-key")
    page.keyboard.type(agent)
    page.keyboard.press("Enter")
    page.wait_for_selector("#key-state:has-text('key set for this tab')")
    # Then the key is in the tab's sessionStorage, never in the URL
    assert page.evaluate("sessionStorage.getItem('cdp.apiKey')") == agent and agent not in page.url

    # When a lookup URL is opened (a new page load: the time to first render is measured by the page itself)
    page.goto("about:blank")
    page.goto(f"{console}#/lookup?namespace=Email&id={EMAIL}")
    page.wait_for_selector("#profile-title")
    first_render_ms = page.evaluate("performance.getEntriesByName('cdp:lookup-rendered')[0].startTime")
    print(f"\nconsole: customer lookup first render {first_render_ms:.0f} ms after navigation start")
    # Then the profile is shown: identities by namespace (with when they were linked), the graph, attributes with
    # their dataset, memberships with status, since and reason, the recent events
    main = page.inner_text("main")
    assert f"Profile {pid}" in main
    for text in ("CRMID", CRM, "ECID", COOKIE, "Email", EMAIL.lower(), "loyalty.tier", "gold", "crm", "shoe-lovers",
                 profile["memberships"]["shoe-lovers"]["reason"], "productView", "login", "Recent events (4 of 4)"):
        assert text in main, text
    # and, under the reason, the evidence: the three shoe views with their day
    assert page.inner_text("ul.evidence[aria-label='Why in shoe-lovers']") == (
        '3 productView (product.category = "shoes") in the last 7 days (needs count >= 3): '
        + dates_text([v["timestamp"] for v in views]))
    assert page.inner_text("#merge-policy") == ("Merge policy: dataset_precedence (crm > loyalty > orders > app-events > "
                                                 "web-events): the source dataset shown won.")
    assert page.locator("svg.graph g.identity").count() == sum(len(v) for v in profile["identities"].values())
    # and each identity with the dataset that linked it: the cookie by the web views, the rest by the CRM record
    linked_by = {ns: {i: link["dataset"] for i, link in ids.items()} for ns, ids in profile["identity_links"].items()}
    assert linked_by == {ns: {i: "web-events" if ns == "ECID" else "crm" for i in ids}
                         for ns, ids in profile["identities"].items()}
    identities_text = page.inner_text("section[aria-labelledby='identities-title']")
    assert "web-events" in identities_text and "crm" in identities_text and "not recorded" not in identities_text
    # and no destination has acknowledged a membership (no runner runs)
    assert page.locator("ul.delivered").count() == 0 and "none acknowledged" in main
    assert page.evaluate("document.activeElement.id") == "profile-title"  # focus moves to the result
    # (the agent's key cannot read the destinations: the page says so where they would be)
    page.wait_for_selector("span.destinations[data-audience='shoe-lovers']:text-is('not shown: this key lacks "
                           "destinations:read')")
    shots.append(screenshot(page, "lookup", f"Profile {pid}", "Identity graph"))
    # When an unknown identity is looked up (typed, Enter), Then the API's problem is shown
    page.fill("#lookup-id", "nobody@example.com")
    page.focus("#lookup-id")
    page.keyboard.press("Enter")
    page.wait_for_selector("main .problem")
    assert "404 Not Found: no profile for this identity" in page.inner_text("main .problem")
    # and the agent's key may not read audiences: the page says so (403, the scope it lacks)
    page.goto(f"{console}#/audiences")
    page.wait_for_selector("main .problem")
    assert "403 Forbidden: this API key lacks the scope 'audiences:read'" in page.inner_text("main .problem")

    # When the data steward (admin key) opens the audience list
    page.fill("#api-key", admin)
    page.press("#api-key", "Enter")
    page.wait_for_selector("span.size[data-audience='shoe-lovers']")
    page.wait_for_selector("span.size[data-audience='gold-loyalty']:text-is('1')")
    # Then each audience has its size and evaluation kind
    row = page.inner_text("tr:has(a[href='#/audiences/edit?id=shoe-lovers'])")
    assert "Shoe lovers" in row and "1" in row and "streaming" in row, row
    shots.append(screenshot(page, "audiences", "shoe-lovers", "gold-loyalty"))

    # When a new audience is typed into the editor, with a mistake first
    page.click("#new-audience")
    page.wait_for_selector("#audience-id")
    page.fill("#audience-id", "shoe-gold")
    page.focus("#audience-query")
    page.keyboard.type('loyalty.tier = "gold" and\ncount(event productView within 7d) >=')
    # Then the error is shown at its line and column, as typed
    page.wait_for_selector("#query-check .invalid")
    assert "line 2, column 38: unexpected end of query; expected a number" in page.inner_text("#query-check")
    # When it is finished, Then it is valid, streaming and not edge, with why
    page.keyboard.type(" 3")
    page.wait_for_selector("#query-check .valid")
    check = page.inner_text("#query-check")
    assert "streaming: every event window fits in the 90d event history" in check, check
    assert "not edge: reads event windows (productView)" in check, check
    # and the draft is in the URL
    assert "id=shoe-gold" in page.url and "productView" in page.url
    # When its size is previewed, Then the one stored customer is counted
    page.click("#preview")
    page.wait_for_selector("#preview-size")
    assert page.inner_text("#preview-size").startswith(f"1 of 1 stored profiles; for example {pid}")
    shots.append(screenshot(page, "audience-editor", "Valid", "1 of 1 stored profiles"))
    # When it is saved (Enter in the id field submits the form)
    page.press("#audience-id", "Enter")
    # Then the worker reloads its definitions and says the audience is live
    page.wait_for_selector("#save-state.ok", timeout=30_000)
    assert page.inner_text("#save-state") == "Saved shoe-gold as version 1: live in the pipeline"
    assert (config / "segments.yaml").read_text().endswith(
        '  - id: shoe-gold\n    name: shoe-gold\n    query: |-\n      loyalty.tier = "gold" and\n'
        '      count(event productView within 7d) >= 3\n')
    # and the customer reaches it in the stream: a membership on the profile, shown by the lookup page
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "shoe-gold" not in http.get(f"/profiles/{pid}").json()["memberships"]:
        time.sleep(0.3)
    page.goto(f"{console}#/lookup?namespace=CRMID&id={CRM}")
    page.wait_for_selector("#profile-title")
    assert "shoe-gold" in page.inner_text("main")
    # (and, with the admin key, where each membership is configured to go)
    page.wait_for_selector("span.destinations[data-audience='shoe-lovers']:text-is('shoe-hook')")
    assert page.inner_text("span.destinations[data-audience='shoe-gold']") == "none"
    assert http.get("/audiences/shoe-gold").json()["size"] == 1
    # and the audience's page charts the entry (entries and exits per minute, the last hour)
    page.goto(f"{console}#/audiences/edit?id=shoe-gold")
    page.wait_for_selector("#flow-totals")
    assert page.inner_text("#flow-totals").startswith("1 entries, 0 exits")
    assert page.locator("svg.flows rect").count() == 1
    assert page.input_value("#audience-query") == 'loyalty.tier = "gold" and\ncount(event productView within 7d) >= 3'
    shots.append(screenshot(page, "audience-chart", "Size 1; entries and exits, last hour"))

    # When the steward simulates the household example with CRM ids no longer unique (keyboard: Space, Enter)
    page.goto(f"{console}#/simulator")
    page.wait_for_selector("#sim-unique-CRMID")
    assert page.is_checked("#sim-unique-CRMID")
    page.focus("#sim-unique-CRMID")
    page.keyboard.press("Space")
    page.focus("#sim-limit")
    page.keyboard.press("Enter")
    # Then today's rules keep the two customers apart and the proposed ones merge them, side by side
    page.wait_for_selector("#sim-proposed")
    assert page.inner_text("#sim-current h3") == "Today's rules: 2 profiles"
    assert page.inner_text("#sim-proposed h3") == "Proposed rules: 1 profile (1 merged)"
    assert "CRMID: A-1, B-2" in page.inner_text("#sim-proposed")
    # and the rules are in the URL: the same simulation again after a reload
    assert "rules=" in page.url and "unique" in page.url
    page.reload()
    page.wait_for_selector("#sim-proposed h3:has-text('Proposed rules: 1 profile (1 merged)')")
    assert not page.is_checked("#sim-unique-CRMID")
    shots.append(screenshot(page, "simulator", "Today's rules: 2 profiles", "Proposed rules: 1 profile"))

    # When an erasure is filed for the e-mail from the privacy page, by keyboard
    page.goto(f"{console}#/privacy")
    page.wait_for_selector("#erase-id")
    page.focus("#erase-id")
    page.keyboard.type(EMAIL)
    page.keyboard.press("Enter")
    # Then its status is followed until done, and the URL holds the request id, not the identity
    page.wait_for_selector("#erasure-status.ok", timeout=60_000)
    assert page.inner_text("#erasure-status") == "done" and "Profile found\tyes" in page.inner_text("main")
    assert "request=" in page.url and EMAIL not in page.url and EMAIL.lower() not in page.url
    shots.append(screenshot(page, "privacy", "Erasure request", "done"))
    # and the customer is gone
    assert http.get("/profiles", params={"namespace": "CRMID", "id": CRM}).status_code == 404
    print("console screenshots: " + ", ".join(str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd())
                                               else str(p) for p in shots))
    http.close()


class Receiver(BaseHTTPRequestHandler):
    """An HTTP destination's endpoint that refuses its first request for good (400) and takes the others."""

    bodies: list[tuple[int, dict[str, Any]]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status = 400 if not self.bodies else 200
        self.bodies.append((status, body))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_the_destinations_page_shows_health_and_redrives(registry: Any, kafka_bootstrap: str, start_worker: Any,
                                                         make_config: Any, tmp_path: Path, browser: Any,
                                                         request: pytest.FixtureRequest) -> None:
    # Given an HTTP destination for gold customers whose endpoint refuses the first batch (a dead letter)
    Receiver.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = make_config('audiences:\n  - {id: gold, name: Gold, query: loyalty.tier = "gold"}\n')
    (config / "destinations.yaml").write_text(
        "destinations:\n  - name: crm\n    kind: http\n    audiences: [gold]\n"
        "    identities:\n      - {namespace: CRMID}\n"
        f"    url: http://127.0.0.1:{server.server_address[1]}/hook\n"
        "    batch: {max_records: 100, max_age_ms: 20}\n    timeout_s: 5\n"
        "    retry: {max_attempts: 2, base_delay_ms: 20, max_delay_ms: 100}\n")
    operator = new_key()
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n" + entry_yaml(ApiKey("operator", hash_key(operator),
                                                   frozenset({"destinations:read", "destinations:redrive"}))))
    worker = start_worker(config_dir=config, extra_env={"PIPELINE_API_KEYS_FILE": str(keys)})
    # and the destination runner beside the worker (its status file in the same data folder)
    runner = PipelineProc(["destinations", "run"], worker.env, tmp_path / "destinations.log")
    try:
        produce(registry, kafka_bootstrap, "ingest.profiles", [{
            "recordId": "g1", "timestamp": int(time.time() * 1000), "dataset": "crm", "crmId": "CRM-GOLD-1",
            "loyalty": {"tier": "gold"}}])
        http = httpx.Client(base_url=worker.url, timeout=30, headers={"Authorization": f"Bearer {operator}"})
        deadline, rows = time.monotonic() + 90, []
        while time.monotonic() < deadline:
            rows = http.get("/destinations").json()
            if rows and rows[0]["dead_letter_depth"] == 1 and rows[0]["runner"] == "running":
                break
            time.sleep(0.5)
        assert rows and rows[0]["dead_letter_depth"] == 1 and rows[0]["runner"] == "running", (rows, runner.log()[-3000:])

        # When the operator opens the destinations page
        page = browser.new_page(viewport={"width": 1280, "height": 700})
        page.goto(f"{worker.url}/console/")
        page.fill("#api-key", operator)
        page.press("#api-key", "Enter")
        page.goto(f"{worker.url}/console/#/destinations")
        page.wait_for_selector("#dlq-crm")
        # Then the destination's health is shown: runner, the refused batch dead-lettered, one dead letter
        row = page.inner_text("tr:has(#dlq-crm)")
        assert row.startswith("crm\thttp\trunning") and page.inner_text("#dlq-crm") == "1", row
        assert "dead-lettered: 1" in row or rows[0]["dead_lettered"] is None, row  # (once the status file says)
        shot = screenshot(page, "destinations", "crm", "Dead letters")
        # When Redrive is pressed (keyboard), Then the dead letter is delivered again and none is left
        page.focus("#redrive-crm")
        page.keyboard.press("Enter")
        page.wait_for_selector("#redrive-state")
        assert page.inner_text("#redrive-state") == "Redriven 1 dead letter of crm"
        page.wait_for_selector("#dlq-crm:text-is('0')")
        assert [status for status, _ in Receiver.bodies] == [400, 200]
        assert Receiver.bodies[0][1] == Receiver.bodies[1][1]
        print(f"console screenshots: {shot}")
        http.close()
    finally:
        server.shutdown()
        stop_all([runner], request)
