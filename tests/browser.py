"""Pages as headless Chromium renders them: the audit report (what loaded, where the findings sit on the first
screen), and :class:`Browser`, which drives a live page as a person would (clicks, typing) through the DevTools
protocol and reads back what the screen shows."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

FIRST_SCREEN = (1366, 768)  # a laptop's screen

# after load: the images and whether each decoded, the page's width against the window's, the box of the
# lead (the confirmed findings) and of its pictures, and the skipped model steps' line (its box and the text it
# shows) with the number of sections that point to it
CHECK = """<script>addEventListener("load", () => {
  const images = [...document.images], lead = document.querySelector(".lead");
  const answer = document.getElementById("answer"), skipped = document.getElementById("skipped");
  const box = e => { const r = e.getBoundingClientRect(); return [r.top, r.bottom, r.left, r.right]; };
  document.body.setAttribute("data-check", JSON.stringify({
    images: images.length, broken: images.filter(i => !i.complete || i.naturalWidth === 0).length,
    scroll_width: document.documentElement.scrollWidth, width: innerWidth, height: innerHeight,
    answer: answer && box(answer), lead: lead && box(lead),
    lead_images: lead ? [...lead.querySelectorAll("img")].map(i => [...box(i), i.naturalWidth]) : [],
    skipped: skipped && box(skipped), skipped_text: skipped && skipped.innerText,
    not_run: [...document.querySelectorAll("p")].filter(p => p.innerText.startsWith("skipped: the model")).length}));
});</script>"""


def chromium() -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):  # CI installs it: a report test that cannot run must not pass unseen
            pytest.fail("chromium is not installed, and CI must render the report")
        pytest.skip("chromium is not installed (.ci/run installs it)")
    return browser


def _chromium(page: str, profile, *flags) -> subprocess.CompletedProcess:
    w, h = FIRST_SCREEN
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", f"--window-size={w},{h}", *flags, page],
                          check=True, capture_output=True, text=True, timeout=120)


def render(report_html, tmp_path) -> dict:
    """Open a copy of ``report_html`` with :data:`CHECK` added, at :data:`FIRST_SCREEN`; its findings."""
    page = tmp_path / "checked.html"
    page.write_text(report_html.read_text().replace("</body>", CHECK + "</body>"))
    dom = _chromium(page.as_uri(), tmp_path / "profile-dom", "--virtual-time-budget=10000", "--dump-dom").stdout
    found = re.search(r'data-check="([^"]*)"', dom)
    assert found, "the page's check did not run"
    return json.loads(found.group(1).replace("&quot;", '"'))


def screenshot(report_html, path, tmp_path) -> None:
    """The first screen of ``report_html`` as a PNG."""
    _chromium(report_html.as_uri(), tmp_path / "profile-shot", f"--screenshot={path}")


class Browser:
    """A headless Chromium driven through its DevTools protocol: open a page, act on it with JavaScript (what a
    click or a keystroke does), wait for what the screen shows, take screenshots.

    Use as a context manager; ``size`` is the window's."""

    def __init__(self, profile, size=FIRST_SCREEN):
        self.profile, self.size = profile, size

    def __enter__(self):
        import asyncio
        import time
        import urllib.request

        w, h = self.size
        self.process = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={self.profile}", f"--window-size={w},{h}", "--remote-debugging-port=0",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + 60
        while not os.path.exists(port_file) or not open(port_file).read().strip():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = open(port_file).read().split()[0]
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._connect(page["webSocketDebuggerUrl"]))
        return self

    async def _connect(self, url):
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.socket = await self.session.ws_connect(url, max_msg_size=0)
        self.next_id = 0

    async def _call(self, method, **params):
        self.next_id += 1
        await self.socket.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = await self.socket.receive_json(timeout=60)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def call(self, method, **params):
        return self.loop.run_until_complete(self._call(method, **params))

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails'].get('text')} "
                               f"{result['exceptionDetails'].get('exception', {}).get('description', '')}")
        return result["result"].get("value")

    def wait(self, condition: str, timeout: float = 30.0):
        """Wait until a JavaScript expression is truthy; its value."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(condition)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"the page never showed: {condition}")
            time.sleep(0.1)

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait("document.readyState === 'complete'")

    def screenshot(self, path) -> None:
        import base64

        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(data))

    def __exit__(self, *exc):
        self.loop.run_until_complete(self.socket.close())
        self.loop.run_until_complete(self.session.close())
        self.loop.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
