"""The audit report as headless Chromium renders it: what loaded and where the findings sit on the first screen."""

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
