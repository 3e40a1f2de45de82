"""The commands shown to a person run as written: every shell command in the README, CONTRIBUTING, the docs and the
deploy files' comments is checked against what it names (the CLI's parser, the extras, the files, the modules), with
token mode on every job-client line and the runtime env wherever a checkout is uploaded."""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import re
import shlex
import tomllib

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
DEPLOY = sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file())
COMMANDS = ("ray ", "RAY_", "kubectl ", "docker ", "python -m ", "guided-saliency ", "pip install ", "mkdocs ")


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def _joined(lines) -> list[str]:
    """Lines with their backslash continuations joined."""
    out, pending = [], ""
    for line in lines:
        line = line.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return [line.strip() for line in out if line.strip()]


def _pasteable(span: str) -> bool:
    """Inline code that is a command to paste, not the mention of one (``ray job submit``, ``python -m jobs.audit``):
    it starts like a command and gives it arguments."""
    argv = span.split()
    return span.startswith(COMMANDS) and len(argv) > (3 if argv[:2] == ["python", "-m"] else 2) and (
        "--" in span or "/" in span or "." in argv[-1])


def shown_commands() -> list[tuple[str, str]]:
    """(where, command) for every shell command shown: bash blocks, inline code that starts like a command, and
    the deploy files' comments."""
    found = []
    for page in PAGES:
        text = page.read_text()
        where = str(page.relative_to(ROOT))
        for block in _blocks(text, "bash"):
            found += [(where, c) for c in _joined(block.splitlines()) if not c.startswith("#")]
        prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        found += [(where, c) for c in re.findall(r"`([^`\n]+)`", prose) if _pasteable(c)]
    for path in DEPLOY:
        comments = [m.group(1) for m in re.finditer(r"#\s?(.*)$", path.read_text(), re.M)]
        for line in _joined(comments):
            for c in re.findall(r"`([^`]+)`", line) or [line]:
                c = c.strip().split(":  ", 1)[-1].strip()
                if _pasteable(c):
                    found.append((str(path.relative_to(ROOT)), c))
    return found


def _steps(command: str) -> list[list[str]]:
    """The simple commands of a line (split at && and ;), each as argv with its environment assignments first."""
    steps = []
    for part in re.split(r"&&|;", command):
        argv = shlex.split(part, comments=True)
        if argv:
            steps.append(argv)
    return steps


EXTRAS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def check(command: str) -> None:
    """Raise AssertionError saying what an operator pasting ``command`` would trip on."""
    from worker.cli import parser

    for argv in _steps(command):
        env = {}
        while argv and re.fullmatch(r"[A-Z_]+=.*", argv[0]):
            key, value = argv.pop(0).split("=", 1)
            env[key] = value
        if not argv:
            continue
        if argv[:2] == ["ray", "job"]:
            assert env.get("RAY_AUTH_MODE") == "token", "a job-client line needs RAY_AUTH_MODE=token"
            if "--working-dir" in argv and argv[argv.index("--working-dir") + 1] == ".":
                assert "--runtime-env" in argv, "--working-dir . uploads .venv/ without deploy/runtime-env.yaml"
                assert (ROOT / argv[argv.index("--runtime-env") + 1]).is_file()
            if "--" in argv:
                check(shlex.join(argv[argv.index("--") + 1:]))
        elif argv[0] == "ray" and argv[1] in ("up", "dashboard", "down", "attach"):
            assert (ROOT / argv[2]).is_file(), f"{argv[2]} does not exist"
        elif argv[:2] in (["python", "-m"], ["guided-saliency", argv[1] if len(argv) > 1 else ""]):
            module = argv[2] if argv[0] == "python" else None
            args = argv[3:] if module else argv[1:]
            if module in (None, "jobs.explain", "jobs.audit", "jobs.scheduled", "jobs.demo"):
                sub = [module.split(".")[1]] if module else []
                parser().parse_args([*sub, *args])  # SystemExit on a flag the CLI does not take
            elif module == "pytest":
                for arg in args:
                    if not arg.startswith("-") and "/" in arg:
                        assert (ROOT / arg.split("::")[0]).exists(), f"{arg} does not exist"
            else:
                assert importlib.util.find_spec(module) is not None, f"no module {module}"
        elif argv[:2] == ["pip", "install"]:
            for arg in argv[2:]:
                extras = re.fullmatch(r"[.\w-]*\[([\w,]+)\]", arg)
                if extras:
                    unknown = set(extras.group(1).split(",")) - EXTRAS
                    assert not unknown, f"pyproject.toml has no extra {unknown}"
        elif argv[:2] == ["kubectl", "apply"]:
            assert (ROOT / argv[argv.index("-k") + 1] / "kustomization.yaml").is_file()
        elif argv[:2] == ["docker", "build"]:
            assert (ROOT / argv[argv.index("-f") + 1]).is_file()
            assert argv[-1] == ".", "the image builds from the repository root"


COMMANDS_SHOWN = shown_commands()


def test_the_commands_are_found():
    where = {w for w, _ in COMMANDS_SHOWN}
    assert {"README.md", "docs/guide/getting-started.md", "deploy/cluster.yaml", "deploy/Dockerfile"} <= where
    assert sum("ray job submit" in c for _, c in COMMANDS_SHOWN) >= 3


@pytest.mark.parametrize("where, command", COMMANDS_SHOWN, ids=[f"{w}:{c[:40]}" for w, c in COMMANDS_SHOWN])
def test_every_shown_command_runs_as_written(where, command):
    try:
        check(command)
    except SystemExit as exc:  # argparse's way of refusing (0: --help)
        if exc.code:
            raise AssertionError(f"{where}: the CLI refuses {command!r}") from exc


@pytest.mark.parametrize("bad, why", [
    ("ray job submit --address http://127.0.0.1:8265 -- python -m jobs.explain --model m --input i --output o",
     "RAY_AUTH_MODE=token"),
    ("RAY_AUTH_MODE=token ray job submit --working-dir . -- python -m jobs.explain --model m --input i --output o",
     "runtime-env"),
    ("guided-saliency explain --model m --input i --output o --batchsize 3", ""),
    ('pip install -e ".[gpu]"', "no extra"),
])
def test_the_check_catches_what_an_operator_would_trip_on(bad, why):
    with pytest.raises((AssertionError, SystemExit), match=why or None):
        check(bad)


def test_the_runtime_env_keeps_the_venv_off_the_upload():
    env = yaml.safe_load((ROOT / "deploy" / "runtime-env.yaml").read_text())
    assert any(".venv" in e for e in env["excludes"])


def test_job_files_shown_in_the_docs_are_valid():
    from worker.job.schedule import parse_config

    shown = [b for p in PAGES for b in _blocks(p.read_text(), "yaml") if "output_root" in b]
    assert shown
    for block in shown:
        parse_config(yaml.safe_load(block))


def test_python_shown_in_the_docs_parses():
    for page in PAGES:
        for block in _blocks(page.read_text(), "python"):
            ast.parse(block)


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150
    for target in re.findall(r"\]\(([^)#]+)", "\n".join(lines)):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_every_docs_page_is_in_the_nav_and_every_package_has_api_pages():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "#"))
    listed = set(re.findall(r"[\w/-]+\.md", str(config["nav"])))
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert pages - listed == set()
    api = "".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.md"))
    for package in ("worker.engine", "worker.data", "worker.job", "worker.audit", "worker.explore", "worker.cli"):
        assert f"<!-- api {package} -->" in api
