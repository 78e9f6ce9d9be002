"""The physicians' page in a real browser: headless Chromium driven by Playwright
(skipped where Chromium or Playwright is not installed; .ci/run installs both)."""

import shutil

import pytest

from agent.store import Store
from agent.agent import Agent
from agent.sync import SyncClient
from agent.sync.client import teks_to_upload
from backend import Backend, BackendConfig
from backend.server import BackgroundServer

from .helpers import FakeClock, fast_passphrase

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_physician_issues_a_code_in_chromium_and_a_patient_declares(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    clock = FakeClock(20_000 * 86_400 + 10 * 3600)
    backend = Backend(BackendConfig(tmp_path / "backend"), clock=clock)
    backend.verification.add_user("dr.who", "tardis-1963")
    with BackgroundServer(backend) as srv, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.goto(srv.url + "/")
        assert page.url.endswith("/login")
        page.fill("input[name=username]", "dr.who")
        page.fill("input[name=password]", "wrong password")
        page.click("button[type=submit]")
        assert "wrong user name or password" in page.content()
        page.goto(srv.url + "/login")
        page.fill("input[name=username]", "dr.who")
        page.fill("input[name=password]", "tardis-1963")
        page.click("button[type=submit]")
        page.select_option("select[name=test_type]", "confirmed")
        page.click("button[type=submit]")
        code = page.inner_text("#code").strip()
        assert len(code) == 8 and code.isdigit()
        assert page.locator("svg").count() == 1  # the QR code rendered
        page.screenshot(path=str(tmp_path / "code.png"))
        browser.close()
        # the patient's agent declares with the code the physician read out
        store = Store.create(tmp_path / "p.db", fast_passphrase(), clock=clock)
        agent = Agent(store)
        agent.rotate(clock.t)
        client = SyncClient(srv.url, trusted_keys=[backend.public_key_b64], sleep=lambda s: None)
        assert client.declare(code, teks_to_upload(store, clock.t), store, now=clock.t)["insertedExposures"] == 1
    assert (tmp_path / "code.png").stat().st_size > 5_000
