"""Build hooks of the docs site (mkdocs.yml): the measured results join the site from ``benchmarks/results/``
(they live there, with their command, date and machine, and the pages link to them), and the options table is
made from :func:`worker.job.config.options`, the one source of every option."""

from __future__ import annotations

import pathlib

from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MARKER = "<!-- options -->"


def on_files(files, config):
    for path in sorted(RESULTS.iterdir()):
        if path.suffix in (".md", ".png"):
            files.append(File(f"results/{path.name}", str(RESULTS.parent), config["site_dir"],
                              config["use_directory_urls"]))
    return files


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def options_table() -> str:
    """A Markdown table of every option: flag, job-file key, default, choices and help."""
    import sys

    sys.path.insert(0, str(ROOT))
    from worker.job.config import OPTION_GROUPS, options

    rows = []
    for group, title in OPTION_GROUPS.items():
        rows.append(f"\n### {title}\n\n| flag | job-file key | default | values | what it does |\n|---|---|---|---|---|")
        for o in options():
            if o.group != group:
                continue
            default = "required" if o.required else ("(decided for you)" if o.default is None else
                                                     f"`{list(o.default) if o.many else o.default}`")
            values = ", ".join(f"`{c}`" for c in o.choices) if o.choices else o.kind.__name__ + (" ..." if o.many
                                                                                               else "")
            key = "(command line only)" if group == "opt-in" else ("(from `output_root`)" if o.name == "output"
                                                                  else f"`{o.name}`")
            rows.append(f"| `{o.flag}` | {key} | {default} | {values} | {_cell(o.help)} |")
    return "\n".join(rows)


def modules(package: str) -> list[str]:
    """Every module of ``package`` (a dotted name under the repository), the package itself first."""
    base = ROOT.joinpath(*package.split("."))
    if base.with_suffix(".py").is_file():
        return [package]
    names = []
    for path in sorted(base.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(set(names), key=lambda n: (n != package, n))


def on_page_markdown(markdown, page, config, files):
    """Fill the options table, and the API pages: ``<!-- api worker.engine -->`` becomes a reference for every
    module of the package, so a new module appears without editing the page."""
    markdown = markdown.replace(MARKER, options_table()) if MARKER in markdown else markdown
    out = []
    for line in markdown.splitlines():
        if line.startswith("<!-- api ") and line.endswith("-->"):
            out.extend(f"::: {name}\n" for name in modules(line[len("<!-- api "):-3].strip()))
        else:
            out.append(line)
    return "\n".join(out)
