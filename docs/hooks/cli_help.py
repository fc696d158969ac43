"""MkDocs hook: the command pages show the ``--help`` of the installed ``suffix-analysis``.

A page asks for a command's help with a comment on a line of its own::

    <!-- cli-help: attack gcg -->

which becomes a text block holding ``suffix-analysis attack gcg --help`` (the parser is
built in this process, so flags, defaults and help are the code's own). After the build,
a command of the parser that no page asked for is a warning, which ``mkdocs build --strict``
turns into a failure: every command has a page.

A line ``<!-- presets-table -->`` becomes the table of model presets
(``suffix_analysis.models.presets.PRESETS``).

The hook also serves the repository's ``figures/*.png`` (drawn by ``suffix-analysis
figures``) at ``assets/figures/`` without copying them into ``docs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.cli_help")

_MARKER = re.compile(r"^<!-- cli-help: ([a-z][a-z -]*?) -->$", flags=re.MULTILINE)
_WIDTH = "100"
_documented: set[str] = set()


def _help(command: str) -> str:
    """``suffix-analysis COMMAND --help``, as the installed parser prints it."""
    from suffix_analysis.cli_parser import build_parser

    argv = command.split() + ["--help"]
    out = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = _WIDTH  # argparse wraps to the terminal's width
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            build_parser(argv).parse_args(argv)
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    text = out.getvalue().rstrip()
    if not text.startswith("usage:"):
        raise ValueError(f"`suffix-analysis {command} --help` printed no help")
    return text


def _presets_table() -> str:
    from suffix_analysis.models.presets import PRESETS

    rows = ["| preset | weights | template | refusal tokens | GPU dtype | paper direction (position, layer) |",
            "|---|---|---|---|---|---|"]
    for p in PRESETS.values():
        tokens = ", ".join(f"`{t}`" for t in p.refusal_tokens)
        paper = f"{p.paper_direction}" if p.paper_direction else ""
        rows.append(f"| `{p.name}` | `{p.source}` | {p.template} | {tokens} | {p.gpu_dtype} | {paper} |")
    return "\n".join(rows)


def _leaf_commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    """Every command the parser runs: 'refusal', 'attack gcg', 'organism build', ..."""
    found = []
    for action in parser._actions:  # argparse has no public walk over sub-commands
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _leaf_commands(sub, f"{prefix}{name} ")
    return found or [prefix.strip()]


def on_pre_build(config, **kwargs) -> None:
    _documented.clear()


def on_files(files, config, **kwargs):
    figures = Path(config.config_file_path).parent / "figures"
    for png in sorted(figures.glob("*.png")):
        files.append(File.generated(config, f"assets/figures/{png.name}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    def replace(match: re.Match) -> str:
        command = match.group(1).strip()
        _documented.add(command)
        return f"```text\n{_help(command)}\n```"

    markdown = _MARKER.sub(replace, markdown)
    if "<!-- presets-table -->" in markdown:
        markdown = markdown.replace("<!-- presets-table -->", _presets_table())
    return markdown


def on_post_build(config, **kwargs) -> None:
    from suffix_analysis.cli_parser import build_parser

    missing = [c for c in _leaf_commands(build_parser([])) if c not in _documented]
    for command in missing:
        log.warning("`suffix-analysis %s` has no command page: add `<!-- cli-help: %s -->` to one", command, command)
