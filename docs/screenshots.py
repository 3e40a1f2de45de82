"""The explorer's screenshots in the docs, made from the demo's output: ``python docs/screenshots.py demo_output``
(after ``python -m jobs.demo``). Writes docs/images/explorer-*.png at 1366 x 900."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import tempfile
import urllib.parse

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser import Browser  # noqa: E402

SETTLED = ("document.getElementById('status').innerText && !document.getElementById('status').innerText"
           ".startsWith('asking') && [...document.images].every(i => i.complete)")


def main(demo: str) -> None:
    images = ROOT / "docs" / "images"
    process = subprocess.Popen([sys.executable, "-m", "jobs.view", f"{demo}/maps", "--audit", f"{demo}/audit",
                                "--port", "0"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        url = re.search(r"http://[\d.]+:\d+/", process.stdout.readline()).group(0)
        with tempfile.TemporaryDirectory() as profile, Browser(profile, size=(1366, 900)) as browser:
            browser.goto(url + "#true=2&sort=-border_mass")
            browser.wait(SETTLED)
            browser.screenshot(images / "explorer-rows.png")
            browser.evaluate("document.querySelector('.card').click()")
            browser.wait("document.getElementById('detail').open && [...document.images].every(i => i.complete)")
            browser.screenshot(images / "explorer-row.png")
            browser.evaluate("document.getElementById('close').click(); document.getElementById('tab-audit').click()")
            browser.wait("document.querySelectorAll('#audit img').length > 0 && "
                         "[...document.images].every(i => i.complete)")
            browser.screenshot(images / "explorer-audit.png")
            probed = next(e["id"] for r in json.loads((pathlib.Path(demo) / "audit" / "audit.json").read_text())
                          ["interventions"]["regions"] if r["shortcut"] for e in r["examples"])
            browser.evaluate(f"location.hash = {json.dumps('id=' + urllib.parse.quote(probed, safe=''))}; "
                             "document.getElementById('tab-rows').click()")
            browser.wait(f"document.querySelector('.card[data-id={json.dumps(probed)}]') !== null")
            browser.wait(SETTLED)
            browser.evaluate(f"document.querySelector('.card[data-id={json.dumps(probed)}]').click()")
            browser.wait("document.querySelectorAll('#detail .probe img').length > 0 && "
                         "[...document.images].every(i => i.complete)")
            browser.evaluate("document.querySelector('#detail .probe').scrollIntoView()")
            browser.screenshot(images / "explorer-probe.png")
    finally:
        process.terminate()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo_output")
