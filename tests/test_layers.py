"""The layers of ``worker/`` as the folders show them, and imports in one direction only:
engine <- job, data <- job <- audit <- explore; the data side, the command line's choices and the explorer need no
TensorFlow."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "worker"
# what each layer may import from worker (besides itself)
ALLOWED = {
    "engine": set(),
    "data": set(),
    "job": {"engine", "data"},
    "audit": {"engine", "data", "job"},
    "explore": {"data", "job", "audit"},
}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "worker" and parts[1] in ALLOWED else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every ``worker...`` module a file imports, at any depth (imports inside functions count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return [(line, name) for line, name in found if name.startswith("worker.") or name == "worker"]


def test_every_module_lives_in_a_layer():
    loose = sorted(p.name for p in ROOT.glob("*.py"))
    assert loose == ["__init__.py", "cli.py", "demo.py"], loose  # entry points above the layers
    assert sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(ALLOWED)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_go_one_way(layer):
    wrong = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for line, name in _imports(path):
            target = _layer(name)
            if name == "worker" or (name.startswith("worker.") and target is None):
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} imports {name} (above the layers)")
            elif target not in ALLOWED[layer] | {layer}:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_data_side_the_cli_choices_and_the_explorer_need_no_tensorflow():
    data = sorted(f"worker.data.{p.stem}" for p in (ROOT / "data").glob("*.py") if p.stem != "__init__")
    code = ("import sys\n" + "".join(f"import {m}\n" for m in data)
            + "import worker.cli, worker.engine.options, worker.engine.targets, worker.job.config\n"
            + "import worker.explore.server\n"
            "worker.cli.parser()\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
            "assert 'keras' not in sys.modules, 'keras was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr[-2000:]
