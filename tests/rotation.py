"""Which cases of a large family of tests a run takes: every kind of case each run, new cases each commit.

A *family* is the parametrized cases of one test function marked ``@pytest.mark.rotate(keep=N, per=(...))``.
The run keeps ``keep`` cases of each group of cases that share the values of the parameters named in ``per``
(of the whole family without ``per``), chosen by the run's seed: with ``per=("variant",)`` each variant runs
on one model, and the model changes from commit to commit.  A *generated* family (the model fuzzer's random
architectures) draws its parameters with :func:`draw` instead, from a population too large to list.

The seed is ``GS_TEST_SEED`` where set, else read from the last commit that changed the code or the tests (a
commit of documentation alone walks the cases the commit before it walked), else 0.  The pytest header
prints it, and every failing test prints the line that runs it again.  ``-m exhaustive`` runs every test,
default and slow, with every case of every family and the generators' large draws.  Naming tests (a node id
or ``-k``) turns the rotation off, so the named case runs whatever the seed.

Example:
    >>> cases = draw("example", range(1000), 3)  # three of a thousand, by this run's seed
    >>> len(cases), cases == draw("example", range(1000), 3)  # the same seed, the same cases
    (3, True)
"""

from __future__ import annotations

import os
import random
import re
import subprocess
from pathlib import Path

ENV = "GS_TEST_SEED"
MARK = "rotate"
EXHAUSTIVE = "exhaustive"
CODE = ("worker", "jobs", "tests", "pyproject.toml")  # what a commit must touch to draw new cases
_ROOT = Path(__file__).resolve().parent.parent
_state: dict = {"seed": None, "exhaustive": False, "markexpr": ""}


def configure(markexpr: str = "") -> None:
    """Set the run's mark expression (``-m``); :func:`seed` finds the seed."""
    _state.update(markexpr=markexpr or "",
                  exhaustive=re.search(rf"(?<!not )\b{EXHAUSTIVE}\b", markexpr or "") is not None)


def exhaustive() -> bool:
    """Whether this run takes every case (``-m exhaustive``)."""
    return _state["exhaustive"]


def seed() -> int:
    """The run's seed: ``GS_TEST_SEED``, else the last code commit's hash, else 0."""
    if _state["seed"] is None:
        _state["seed"] = int(os.environ[ENV]) if os.environ.get(ENV) else _commit_seed()
    return _state["seed"]


def _commit_seed() -> int:
    try:
        commit = subprocess.run(["git", "log", "-1", "--format=%H", "--", *CODE], cwd=_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return int(commit[:8], 16) if re.fullmatch(r"[0-9a-f]{40}", commit) else 0


def _rng(name: str) -> random.Random:
    return random.Random(f"{seed()}:{name}")


def draw(name: str, population, k: int, exhaustive_k: int | None = None) -> list:
    """``k`` members of ``population`` (``exhaustive_k`` under ``-m exhaustive``), by the seed and ``name``."""
    population = list(population)
    if exhaustive() and exhaustive_k is not None:
        k = exhaustive_k
    return sorted(_rng(name).sample(population, min(k, len(population))))


def select(items: list) -> tuple[list, list]:
    """(kept, dropped): the rotated families' cases this run takes, the others dropped; the rest kept."""
    if exhaustive():
        return items, []
    groups: dict[tuple, list] = {}
    for item in items:
        mark = item.get_closest_marker(MARK)
        if mark is None or not hasattr(item, "callspec"):
            continue
        per = tuple(mark.kwargs.get("per", ()))
        unknown = [p for p in per if p not in item.callspec.params]
        if unknown:
            raise ValueError(f"{item.nodeid}: rotate(per=...) names {unknown}, not parameters of the test")
        key = (item.parent.nodeid, item.originalname) + tuple(str(item.callspec.params[p]) for p in per)
        groups.setdefault(key, []).append(item)
    dropped = set()
    for key, members in groups.items():
        keep = int(members[0].get_closest_marker(MARK).kwargs.get("keep", 1))
        chosen = _rng(repr(key)).sample(sorted(m.nodeid for m in members), min(keep, len(members)))
        dropped.update(m.nodeid for m in members if m.nodeid not in chosen)
    return ([i for i in items if i.nodeid not in dropped], [i for i in items if i.nodeid in dropped])


def again(nodeid: str) -> str:
    """The command that runs one test again with this run's cases."""
    return f"{ENV}={seed()} python -m pytest -m '{_state['markexpr'] or 'slow or not slow'}' '{nodeid}'"


def summary() -> str:
    """The line that tells a run's seed."""
    return (f"rotation seed {seed()}: {ENV}={seed()} repeats this run's cases, -m {EXHAUSTIVE} runs every case"
            + (" (this run did)" if exhaustive() else ""))
