"""The one progress line: its numbers, and what it writes off a terminal."""

import io
import time

from worker.job.progress import Progress


def test_progress_line_counts_rate_eta_and_errors():
    p = Progress("explain", 900, stream=None)
    assert p._line(450, 3, 9.0) == "explain: 450/900 rows (50%), 50.0 rows/s, ETA 9 s, 3 errors"
    assert p._line(900, 1, 10.0) == "explain: 900/900 rows (100%), 90.0 rows/s, 1 error"  # no ETA when done
    assert p._line(0, None, 1.0) == "explain: 0/900 rows (0%), 0.0 rows/s"  # no errors counted: none shown


def test_off_a_terminal_one_final_line_with_the_errors_polled():
    out = io.StringIO()
    with Progress("audit", 4, unit="files", errors=lambda: 2, stream=out) as p:
        p.done = 3
        time.sleep(0.6)  # the writer thread runs, but writes off a terminal only every PLAIN_EVERY_S
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("audit: 4/4 files (100%)") and lines[0].endswith("2 errors"), lines
