"""The live console of `onnxfn up`, in a real browser (Debian's chromium driven by Playwright):
while digits events flow, the page shows the function's process and cold start, the trigger's rate
rising, a dead letter with its reason, and a trace; the numbers change between two screenshots;
re-publishing the dead letter sends it through the broker again."""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from pathlib import Path

import pytest
import requests
from test_pipeline import MODELS, ROOT, _digits_images
from test_up import Output, start_up, stop_up

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = ROOT / "docs" / "console.png"
# Chromium on a machine with no network: no background connections, no sandbox as root.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]  # fmt: skip


def _event(type_: str, data: object) -> tuple[dict[str, str], str]:
    headers = {"ce-specversion": "1.0", "ce-id": uuid.uuid4().hex, "ce-source": "/tests/console",
               "ce-type": type_, "content-type": "application/json"}  # fmt: skip
    return headers, json.dumps(data)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (make test installs Debian's where apt can)")
def test_the_console_shows_live_numbers_dead_letters_and_traces_in_a_browser(tmp_path: Path) -> None:
    if not (MODELS / "digits").is_dir():
        pytest.skip("no digits model: run `make models`")
    sync_api = pytest.importorskip("playwright.sync_api")
    argv = ["up", "--samples", "0", "--quiet", "--ingress-port", "0", "--idle-window", "60"]
    argv += ["--state-file", str(tmp_path / "platform.json"), "--traces", str(tmp_path / "traces")]
    process = start_up(argv)
    out = Output(process)
    stop = threading.Event()
    try:
        ingress = out.wait_for(r"^broker ingress:\s+(\S+)", 60).group(1)
        console = out.wait_for(r"^console:\s+(\S+)", 60).group(1)
        out.wait_for(r"^READY$", 60)
        images = _digits_images(20)
        poison_headers, poison_body = _event("dev.onnxfn.digits.request", {"image": [1, 2, 3]})
        poison = poison_headers["ce-id"]

        def publish() -> None:  # ~20 events/s, bounded, until the test ends
            for index in range(600):
                if stop.wait(0.05):
                    return
                headers, body = _event("dev.onnxfn.digits.request", {"image": images[index % 20][0]})
                requests.post(ingress, data=body, headers=headers, timeout=10)

        assert requests.post(ingress, data=poison_body, headers=poison_headers, timeout=10).status_code == 202
        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.goto(console)
            digits = 'tr[data-trigger="Trigger/digits"]'
            page.wait_for_function(
                f"() => parseFloat(document.querySelector('{digits} .rate')?.textContent) > 0", timeout=60_000
            )
            page.wait_for_selector('tr[data-revision="digits-v1-cpu"] td:has-text("s (")', timeout=30_000)
            ready = page.inner_text('tr[data-revision="digits-v1-cpu"] .processes')
            assert int(ready.split("/")[0]) >= 1, ready  # a ready process after the cold start
            row = page.wait_for_selector(f'#dead tr[data-id="{poison}"]', timeout=60_000)
            assert row is not None and "HTTP 400" in row.inner_text() and "image" in row.inner_text()
            page.wait_for_selector('#traces td:has-text("function digits")', timeout=60_000)

            first_count = int(page.inner_text(f"{digits} .delivered"))
            first = page.screenshot(full_page=True)
            page.wait_for_function(
                f"() => parseInt(document.querySelector('{digits} .delivered').textContent) > {first_count + 20}",
                timeout=60_000,
            )
            second = page.screenshot(full_page=True)
            assert first != second and first[:8] == b"\x89PNG\r\n\x1a\n" and len(second) > 20_000
            if os.environ.get("ONNXFN_WRITE_SCREENSHOT"):
                SCREENSHOT.write_bytes(second)

            page.click(f'#dead tr[data-id="{poison}"] button[data-republish]')
            page.wait_for_selector(f'#dead tr[data-id="{poison}"] .ok:has-text("re-published")', timeout=10_000)
            # through the broker and the function again: dead-lettered a second time, as it still is invalid
            page.wait_for_function(
                f"() => document.querySelectorAll('#dead tr[data-id=\"{poison}\"]').length >= 2", timeout=60_000
            )
            browser.close()
    finally:
        stop.set()
        assert stop_up(process) == 0
