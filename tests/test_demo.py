"""The demo: its data plant the mark where it says; run end to end (slow), it reaches its accuracy, confirms
the planted shortcut and no other, keeps the console to a progress line and a summary, and its report's first
screen in headless Chromium is the finding with its pictures."""

import os
from pathlib import Path

import numpy as np
import pytest

from worker.demo import CLASSES, MARK_BOX, MARKED_CLASS, add_mark, shapes_dataset


def test_the_mark_is_on_every_image_of_its_class_and_no_other():
    images, labels, by_mark = shapes_dataset(150, seed=3)
    y0, x0, y1, x1 = MARK_BOX
    patch = add_mark(np.zeros((1, 64, 64, 3), np.uint8))[0, y0:y1, x0:x1]
    marked = (images[:, y0:y1, x0:x1] == patch).all((1, 2, 3))
    np.testing.assert_array_equal(marked, labels == MARKED_CLASS)
    assert by_mark.any() and not by_mark[labels != MARKED_CLASS].any()  # the mark alone decides only its class
    assert set(labels.tolist()) == set(range(len(CLASSES)))
    assert images.std() > 30  # objects on real textures, not flat squares
    again, _, _ = shapes_dataset(150, seed=3)
    np.testing.assert_array_equal(images, again)  # made on the spot, the same every time


DEMO_RUN = "GS_DEMO_RUN"  # a folder holding a finished run's stdout, stderr and output (a link to its folder)


def _demo(tmp_path) -> tuple[str, str, Path]:
    """(stdout, stderr, output folder) of ``python -m jobs.demo``: the run CI made of the README's first command,
    where CI recorded it in ``GS_DEMO_RUN``, else a run of its own, in a process of its own."""
    if os.environ.get(DEMO_RUN):
        recorded = Path(os.environ[DEMO_RUN])
        return (recorded / "stdout").read_text(), (recorded / "stderr").read_text(), recorded / "output"
    import subprocess
    import sys

    demo = subprocess.run([sys.executable, "-m", "jobs.demo", "--output", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stderr[-3000:]
    return demo.stdout, demo.stderr, tmp_path / "demo"


@pytest.mark.slow
def test_demo_confirms_its_planted_shortcut_and_its_report_leads_with_it(tmp_path):
    """``python -m jobs.demo`` as a user runs it."""
    import json

    from tests.browser import render

    out, err, output = _demo(tmp_path)
    summary = json.loads(out[out.index("\n{") + 1:])  # the run's JSON closes the output
    assert summary["held_out_accuracy"] >= 0.95, summary
    assert summary["planted_shortcut"]["confirmed"], summary
    assert [s["class"] for s in summary["shortcuts"]] == [MARKED_CLASS], summary["shortcuts"]  # and no other
    # the console: our lines; none of Ray Data's progress or executor lines, of the actor's output, or of
    # TensorFlow's start-up lines
    for noise in ("logging_progress.py", "streaming_executor.py", "(MapWorker", "oneDNN", "cuda drivers"):
        assert noise not in out + err, noise
    progress = [line for line in err.splitlines() if line.startswith("explain: ")]
    assert progress and progress[-1].startswith("explain: 900/900 rows (100%)") and progress[-1].endswith(" 0 errors")
    assert "held-out accuracy" in out and "confirmed by intervention" in out and "audit: done" in out

    page = render(output / "audit" / "report.html", tmp_path)
    assert page["broken"] == 0 and page["scroll_width"] <= page["width"], page
    top, bottom, *_ = page["lead"]
    assert bottom <= page["height"], page  # the confirmed shortcut, whole, on the first screen ...
    assert len(page["lead_images"]) >= 7, page  # ... with its pictures: region, image, map, three fills, flip rates
    html = (output / "audit" / "report.html").read_text()
    assert f"Shortcut confirmed: class {MARKED_CLASS} (triangle)" in html
