"""The dashboard end to end, in headless Chromium, against a running gateway.

One gateway (two mock nodes, a tiny GGUF model Shardon starts with llama-cpp-python, an admin key,
a tenant key) and one browser serve the whole module; the tests run in order, as an operator
would: sign in, look, load a model, create and revoke a key, search the requests, sign out. The
last ones write a screenshot of every page at 1280x800 and 390x844, light and dark, into
``build/ui-screenshots/``.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shardon.config import load_config
from tests.support import GatewayThread, free_port
from tests.web.helpers import ADMIN, TEAM_KEY, admin, chat

SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "ui-screenshots"
SIZES = ((1280, 800), (390, 844))
SCHEMES = ("light", "dark")
WAIT_S = 15.0


# -- the site and the browser ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    from shardon.lifecycle.tiny_gguf import write_tiny_gguf
    from shardon.upstream.mock import MockConfig, MockNodeThread

    tmp = tmp_path_factory.mktemp("ui")
    nodes = [
        MockNodeThread(MockConfig(models=["m1", "m2"], chunks=8, name="a")),
        MockNodeThread(MockConfig(models=["m1"], chunks=8, name="b")),
    ]
    for node in nodes:
        node.start()
    raw = {
        "server": {"port": free_port(), "drain_timeout_s": 5},
        "upstream": {"health_interval_s": 0.5},
        "nodes": [
            {"id": "node-a", "url": nodes[0].url, "models": ["m1", "m2"], "max_concurrent": 4},
            {"id": "node-b", "url": nodes[1].url, "models": ["m1"], "max_concurrent": 2},
        ],
        "models": [{"name": "tiny", "path": write_tiny_gguf(tmp / "tiny.gguf"), "context": 256, "idle_ttl_s": 600}],
        "scheduler": {"queue_timeout_s": 60},
        "auth": {"admin_keys": [ADMIN]},
        "tenants": [{"name": "team", "keys": [{"key": TEAM_KEY, "id": "team-main"}]}],
        "store": {"path": str(tmp / "shardon.db")},
        "demo": False,
        "models_dir": str(tmp / "no-models"),
    }
    path = tmp / "shardon.yaml"
    path.write_text(yaml.safe_dump(raw))
    gateway = GatewayThread(load_config(path, environ={})).start()
    try:
        yield gateway
    finally:
        gateway.stop()
        for node in nodes:
            node.stop()


class Page:
    """The browser on the dashboard: navigation that waits for the page to be drawn, and lookups."""

    def __init__(self, driver: Any, url: str) -> None:
        self.driver = driver
        self.url = url

    def wait(self, predicate: Callable[[], Any], timeout: float = WAIT_S, what: str = "condition") -> Any:
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(
            lambda _: predicate(), message=f"{what} not met within {timeout}s"
        )

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def call(self, script: str, *args: Any) -> Any:
        """Run an async script: its last argument is the callback that returns its result."""
        return self.driver.execute_async_script(script, *args)

    def main(self) -> dict[str, str]:
        return self.js("return Object.assign({}, document.getElementById('main')?.dataset || {})") or {}

    def open(self, route: str) -> None:
        """Show ``#/route`` and wait until its page has been drawn."""
        before = self.main().get("mount")
        if self.driver.current_url.split("#")[0] != f"{self.url}/ui/":
            self.driver.get(f"{self.url}/ui/#/{route}")
        else:
            self.js("location.hash = arguments[0]", f"#/{route}")
        self.ready(before)

    def ready(self, before: str | None = None) -> None:
        def drawn() -> bool:
            state = self.main()
            return state.get("ready") == "1" and state.get("mount") not in (None, before)

        self.wait(drawn, what="page drawn")

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def text(self, css: str) -> str:
        return str(self.js("return document.querySelector(arguments[0])?.textContent ?? null", css))

    def fetch_status(self, path: str, method: str = "GET") -> int:
        script = (
            "const done = arguments[2];"
            " fetch(arguments[0], {method: arguments[1]}).then(r => done(r.status), () => done(-1))"
        )
        return int(self.call(script, path, method))

    def fmt(self, name: str, *args: Any) -> str:
        """The page's own number formatting (format.js) of ``args``."""
        return str(
            self.call(
                "const [n, a, done] = arguments; import('/ui/static/format.js').then(m => done(m[n](...a)))",
                name,
                list(args),
            )
        )

    def look(self, width: int, height: int, scheme: str) -> None:
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
        )
        self.driver.execute_cdp_cmd(
            "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": scheme}]}
        )


@pytest.fixture(scope="module")
def page(browser: Any, site: GatewayThread) -> Iterator[Page]:
    browser.delete_all_cookies()
    p = Page(browser, site.url)
    p.look(1280, 800, "light")
    yield p
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


@pytest.fixture(autouse=True)
def no_script_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """No test leaves a script error or a blocked resource (CSP) in the browser's console."""
    yield
    if "page" in request.fixturenames:
        driver = request.getfixturevalue("browser")
        entries = driver.get_log("browser")
        errors = [e for e in entries if e["level"] == "SEVERE" and e.get("source") != "network"]
        assert not errors, errors


# -- the tests, in the order an operator works ----------------------------------------------------


def test_sign_in_takes_an_admin_key_and_no_other(page: Page, site: GatewayThread) -> None:
    from selenium.webdriver.common.by import By

    driver = page.driver
    driver.get(f"{site.url}/ui/")
    assert driver.current_url == f"{site.url}/ui/login"
    for wrong in (TEAM_KEY, "sk-nothing"):
        driver.find_element(By.ID, "key").send_keys(wrong)
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        page.wait(lambda: page.find_all("p.error"), what="sign-in error")
        assert "not an admin key" in page.text("p.error")
        assert driver.get_cookies() == []
    driver.find_element(By.ID, "key").send_keys(ADMIN)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    page.ready()
    assert driver.current_url.startswith(f"{site.url}/ui/")
    assert page.main()["page"] == "overview"
    cookie = driver.get_cookie("shardon_session")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    assert cookie["expiry"] == pytest.approx(time.time() + 43200, abs=120)
    assert page.js("return document.cookie") == ""  # the page's scripts never see the session
    assert "admin-0" in page.text("#who")


def test_overview_shows_what_the_request_log_says(page: Page, site: GatewayThread) -> None:
    for i in range(25):
        assert chat(site.url, TEAM_KEY, model="m2" if i % 3 == 0 else "m1", stream=i % 2 == 0).status == 200
    for _ in range(3):
        assert chat(site.url, "sk-wrong").status == 401
    for _ in range(2):
        assert chat(site.url, TEAM_KEY, model="nope").status == 404
    page.open("overview?window=900")
    main = page.main()
    stats = admin(site.url, f"/admin/stats?since={main['since']}").json()
    cards = {
        name: page.js("return Object.assign({}, document.getElementById(arguments[0]).dataset)", f"card-{name}")
        for name in ("rps", "tps", "errors", "ttft", "inflight", "queued")
    }
    assert int(cards["rps"]["total"]) == stats["total"] == 30
    assert int(cards["errors"]["failed"]) == stats["failed"] == 5
    assert int(cards["tps"]["total"]) == stats["tokens"]["prompt"] + stats["tokens"]["completion"]
    assert float(cards["ttft"]["p50"]) == stats["ttft_ms"]["p50"]
    assert float(cards["ttft"]["p99"]) == stats["ttft_ms"]["p99"]
    assert int(cards["inflight"]["value"]) == 0 and int(cards["inflight"]["capacity"]) == 6
    # What is shown is those numbers, formatted for people.
    assert page.text("#card-rps .card-sub") == "30 in 15 min"
    assert page.text("#card-errors .card-value") == "16.7%"
    assert page.text("#card-errors .card-sub") == "5 failed of 30"
    assert page.text("#card-ttft .card-value") == page.fmt("ms", stats["ttft_ms"]["p50"])
    assert page.text("#card-ttft .card-sub") == "p99 " + page.fmt("ms", stats["ttft_ms"]["p99"])
    by_model = {m["model"]: m for m in admin(site.url, f"/admin/stats/models?since={main['since']}").json()["data"]}
    cells = page.js("return [...document.querySelectorAll('tr[data-model=\"m1\"] td')].map(td => td.textContent)")
    assert cells[0] == "m1" and cells[1] == str(by_model["m1"]["total"]) == "16"
    node_a = page.js("return document.querySelector('tr[data-node=\"node-a\"]').textContent")
    assert "healthy" in node_a and "/ 4" in node_a
    for chart in ("requests", "tokens", "ttft", "load"):
        assert page.js(f"return document.querySelector('#chart-{chart} path.line').getAttribute('d')")
    # It keeps itself up to date.
    drawn = int(page.main()["refreshed"])
    assert chat(site.url, TEAM_KEY).status == 200
    page.wait(lambda: page.js("return document.getElementById('card-rps').dataset.total") == "31", timeout=12)
    assert int(page.main()["refreshed"]) > drawn


def test_numbers_are_formatted_for_people(page: Page) -> None:
    cases = {
        ("num", 950): "950",
        ("num", 1234): "1.2k",
        ("num", 56789): "57k",
        ("num", 3_400_000): "3.4M",
        ("ms", 0.42): "0.4 ms",
        ("ms", 350.2): "350 ms",
        ("ms", 1500): "1.5 s",
        ("ms", 150000): "2.5 min",
        ("rate", 0.25): "0.25/s",
        ("rate", 12.34): "12.3/s",
        ("rate", 4500): "4.5k/s",
        ("pct", 0.125): "12.5%",
        ("pct", 0): "0%",
        ("mb", 512): "512 MB",
        ("mb", 1536): "1.5 GB",
        ("duration", 3 * 3600 + 300): "3 h 5 min",
        ("int", 12345): "12,345",
    }
    for (name, value), expected in cases.items():
        assert page.fmt(name, value) == expected, (name, value)
    assert page.fmt("num", None) == "—"


def test_nodes_show_health_capacity_and_models(page: Page) -> None:
    page.open("nodes")
    cards = {el.get_attribute("data-node"): el.text for el in page.find_all("article.node")}
    assert set(cards) == {"node-a", "node-b"}
    assert "healthy" in cards["node-a"] and "0 / 4" in cards["node-a"] and "closed" in cards["node-a"]
    assert "0 / 2" in cards["node-b"]
    assert page.js("return [...document.querySelectorAll('[data-node=\"node-a\"] .chip')].map(c => c.textContent)") == [
        "m1",
        "m2",
    ]
    assert "2 of 2 healthy" in page.text("#main .facts")


def test_a_node_drains_and_resumes_from_its_card(page: Page, site: GatewayThread) -> None:
    if not page.driver.current_url.endswith("#/nodes"):
        page.open("nodes")

    def draining() -> bool:
        return bool(admin(site.url, "/admin/nodes/node-b").json()["draining"])

    assert page.find_all("[data-node='node-b'] button[data-action='remove']") == []  # a config node: drained only
    page.find("[data-node='node-b'] button[data-action='drain']").click()
    page.wait(lambda: page.find_all("[data-node='node-b'] .drain"), what="draining badge")
    assert draining() and "node-b: draining" in page.text("#toasts")
    page.find("[data-node='node-b'] button[data-action='resume']").click()
    page.wait(lambda: not page.find_all("[data-node='node-b'] .drain"), what="badge gone")
    assert not draining()


def test_models_load_and_unload_from_the_page(page: Page, site: GatewayThread) -> None:
    if importlib.util.find_spec("llama_cpp") is None:  # found, not imported: it runs in its own process
        pytest.skip("needs llama-cpp-python[server] (the demo or llama extra)")
    page.open("models")

    def state() -> str | None:
        return page.js("return document.querySelector('tr[data-model=\"tiny\"]')?.dataset.state ?? null")

    def admin_state() -> str:
        rows = admin(site.url, "/admin/models").json()["data"]
        return str(next(r for r in rows if r["name"] == "tiny")["state"])

    assert state() == "unloaded" and admin_state() == "unloaded"
    assert page.find_all("tr[data-model='m1'] button") == []  # a node's model: nothing to load here
    assert page.find_all("#memory-cpu")  # the CPU budget's bar
    page.find("tr[data-model='tiny'] button[data-action='load']").click()
    page.wait(lambda: state() == "ready", timeout=90, what="tiny ready")
    assert admin_state() == "ready"
    page.wait(lambda: "tiny: ready" in page.text("#toasts"), what="load toast")
    used = page.js("return document.querySelector('#memory-cpu .meter-fill').style.width")
    assert float(used.rstrip("%")) > 0
    row = page.js("return document.querySelector('tr[data-model=\"tiny\"]').textContent")
    assert "MB" in row  # its memory estimate
    page.find("tr[data-model='tiny'] button[data-action='unload']").click()
    page.wait(lambda: state() == "unloaded", timeout=60, what="tiny unloaded")
    assert admin_state() == "unloaded"


def test_a_new_key_is_shown_once_works_and_can_be_revoked(page: Page, site: GatewayThread) -> None:
    driver = page.driver
    driver.execute_cdp_cmd(
        "Browser.grantPermissions",
        {"origin": site.url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
    )
    page.open("tenants")
    page.find("#create-key").click()
    page.find("#key-tenant").send_keys("team-ui")
    page.find("#key-rpm").send_keys("600")
    page.find("#key-submit").click()
    page.wait(lambda: page.find_all("#new-secret"), what="the new secret")
    secret = page.find("#new-secret").get_attribute("value")
    key_id = page.text("#new-key-id")
    assert secret.startswith("sk-shardon-") and key_id.startswith("key_")
    page.find("#copy-secret").click()
    page.wait(lambda: page.text("#copy-secret") == "Copied", what="copied")
    assert page.call("navigator.clipboard.readText().then(arguments[0], e => arguments[0]('error: ' + e))") == secret
    page.find("#secret-done").click()
    page.wait(lambda: not page.find_all("dialog"), what="dialog closed")
    assert secret not in driver.page_source  # shown once: gone with its dialog
    # The key works on /v1 at once, with the limits it was given.
    assert chat(site.url, secret).status == 200
    listed = {k["id"]: k for k in admin(site.url, "/admin/keys").json()["data"]}
    assert listed[key_id]["tenant"] == "team-ui" and listed[key_id]["rpm"] == 600
    page.open("tenants?window=1h")
    assert secret not in driver.page_source
    page.wait(lambda: page.find_all(f"tr[data-key='{key_id}']"), what="the key listed")
    usage = page.js("return document.querySelector('tr[data-tenant=\"team-ui\"]').textContent")
    assert "team-ui" in usage
    # Revoked from the page (after confirming): refused on /v1 from the next request.
    page.find(f"tr[data-key='{key_id}'] button[data-action='revoke']").click()
    page.wait(lambda: page.find_all("#confirm-ok"), what="confirmation")
    page.find("#confirm-ok").click()
    page.wait(lambda: not page.find_all(f"#keys tr[data-key='{key_id}']"), what="the key gone")
    assert chat(site.url, secret).status == 401
    assert key_id not in {k["id"] for k in admin(site.url, "/admin/keys").json()["data"]}
    page.open("audit")
    actions = page.js(
        "return [...document.querySelectorAll('tr[data-action]')].map(r => [r.dataset.action, r.textContent])"
    )
    assert [a for a, _ in actions[:2]] == ["key.revoke", "key.create"]
    assert all("admin-0 (ui)" in text and key_id in text for _, text in actions[:2])
    assert any(a == "ui.sign_in" for a, _ in actions)


def test_requests_filter_by_status_page_and_open_a_receipt(page: Page, site: GatewayThread) -> None:
    from selenium.webdriver.support.ui import Select

    page.open("requests")
    Select(page.find("#status")).select_by_value("4xx")
    before = page.main()["mount"]
    page.find("#filters button[type=submit]").click()
    page.ready(before)
    assert "status=4xx" in page.driver.current_url
    statuses = page.js("return [...document.querySelectorAll('tr[data-status]')].map(r => r.dataset.status)")
    expected = admin(site.url, "/admin/requests?status=4xx").json()
    assert statuses == [str(r["status"]) for r in expected["data"]]
    assert set(statuses) == {"401", "404"} and len(statuses) == expected["total"] >= 5
    assert page.js("return document.getElementById('count').dataset.total") == str(expected["total"])
    # Successful ones, 25 a page: the next page holds the rest.
    page.open("requests?status=2xx&limit=25")
    total = admin(site.url, "/admin/requests?status=2xx&limit=1").json()["total"]
    assert total > 25
    assert page.text("#count") == f"1\N{EN DASH}25 of {total}"
    before = page.main()["mount"]
    page.find("#next").click()
    page.ready(before)
    assert page.text("#count") == f"26\N{EN DASH}{total} of {total}"
    assert len(page.find_all("tr[data-status='200']")) == total - 25
    # One request: its receipt, as the admin API has it.
    first = page.find("tr[data-status='200'] a")
    request_id = first.text
    before = page.main()["mount"]
    first.click()
    page.ready(before)
    receipt = json.loads(page.text("#receipt"))
    logged = admin(site.url, f"/admin/requests/{request_id}").json()
    assert receipt == logged["receipt"]
    assert receipt["request_id"] == request_id and receipt["output_sha256"]
    assert "Request " + request_id in page.text("#page-title")
    assert page.js("return document.querySelectorAll('.timeline .seg').length") == 3
    before = page.main()["mount"]
    page.find("a.back").click()
    page.ready(before)
    assert page.text("#count") == f"26\N{EN DASH}{total} of {total}"  # back where the list was


def test_the_dashboard_works_from_the_keyboard(page: Page) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    def reload() -> None:  # focus starts from the top of a fresh page
        page.driver.get(f"{page.url}/ui/#/overview")
        page.driver.refresh()
        page.ready()

    reload()
    keys = ActionChains(page.driver)
    keys.send_keys(Keys.TAB).perform()
    assert page.js("return document.activeElement.className") == "skip"
    keys.send_keys(Keys.ENTER).perform()
    assert page.js("return document.activeElement.id") == "main"
    assert page.main()["page"] == "overview"
    reload()
    for _ in range(12):  # to the navigation's Models link
        keys.send_keys(Keys.TAB).perform()
        if page.js("return document.activeElement.dataset.page") == "models":
            break
    else:
        pytest.fail("the Models link is not reachable with Tab")
    assert page.js("return getComputedStyle(document.activeElement).outlineStyle") == "solid"  # focus is visible
    before = page.main()["mount"]
    keys.send_keys(Keys.ENTER).perform()
    page.ready(before)
    assert page.main()["page"] == "models"
    assert page.js("return document.activeElement.id") == "page-title"  # focus follows the page
    # A dialog opens, holds the focus, and Escape closes it.
    page.open("tenants")
    page.find("#create-key").click()
    assert page.js("return document.activeElement.closest('dialog') !== null")
    ActionChains(page.driver).send_keys(Keys.ESCAPE).perform()
    page.wait(lambda: not page.find_all("dialog"), what="dialog closed by Escape")


def test_screenshots_of_every_page_light_and_dark_laptop_and_phone(page: Page, site: GatewayThread) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("llama_cpp") is not None:  # a model in use, for the picture
        assert admin(site.url, "/admin/models/tiny/load", "POST").status == 200
        assert chat(site.url, TEAM_KEY, model="tiny").status == 200
    request_id = admin(site.url, "/admin/requests?status=2xx&limit=1").json()["data"][0]["id"]
    routes = {
        "overview": "overview",
        "nodes": "nodes",
        "models": "models",
        "requests": "requests",
        "request": f"requests/{request_id}",
        "tenants": "tenants",
        "audit": "audit",
    }
    backgrounds = {}
    for scheme in SCHEMES:
        for width, height in SIZES:
            page.look(width, height, scheme)
            for name, route in routes.items():
                page.open(route)
                page.js("window.scrollTo(0, 0)")
                overflow = page.js("return document.documentElement.scrollWidth - window.innerWidth")
                assert overflow <= 0, f"{name} at {width}x{height} is wider than the screen by {overflow}px"
                scrolled = page.js(
                    "return [...document.querySelectorAll('.table-wrap')]"
                    ".filter(w => w.scrollWidth > w.clientWidth + 1).length"
                )
                assert scrolled == 0, f"a table of {name} at {width}x{height} does not fit"
                page.driver.save_screenshot(str(SCREENSHOTS / f"{name}-{width}x{height}-{scheme}.png"))
            backgrounds[scheme] = page.js("return getComputedStyle(document.body).backgroundColor")
    assert backgrounds["light"] != backgrounds["dark"]  # the system's setting is followed
    page.look(1280, 800, "light")


def test_signing_out_ends_the_session_and_everything_closes(page: Page, site: GatewayThread) -> None:
    driver = page.driver
    page.open("overview")
    cookie = driver.get_cookie("shardon_session")
    page.find("#sign-out").click()
    page.wait(lambda: driver.current_url == f"{site.url}/ui/login", what="back at sign-in")
    assert driver.get_cookie("shardon_session") is None
    # Nothing under /ui, nor the admin API, answers the browser now, even with the old cookie
    # (asked from a page of this origin whose policy lets it fetch: the sign-in page's does not).
    driver.add_cookie({k: cookie[k] for k in ("name", "value", "path")})
    driver.get(f"{site.url}/ui/session")
    assert '"invalid_api_key"' in driver.page_source
    for path in ("/ui/session", "/ui/static/app.js", "/admin/stats", "/admin/overview", "/admin/keys"):
        assert page.fetch_status(path) == 401, path
    assert page.fetch_status("/admin/keys", "POST") == 401
    driver.get(f"{site.url}/ui/")
    assert driver.current_url == f"{site.url}/ui/login"
    # The sign-in page, light and dark, at both sizes.
    driver.delete_all_cookies()
    for scheme in SCHEMES:
        for width, height in SIZES:
            page.look(width, height, scheme)
            driver.get(f"{site.url}/ui/login")
            driver.save_screenshot(str(SCREENSHOTS / f"login-{width}x{height}-{scheme}.png"))
    page.look(1280, 800, "light")
