"""The documentation site (mkdocs.yml, docs/): every public module has an API page.

Static and cheap: it reads file names and the ``::: module`` blocks of docs/api/*.md, and
imports nothing. ``mkdocs build --strict`` (CI) checks the rest: links, the pages of the
nav, and that every ``suffix-analysis`` command has a page.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "suffix_analysis"
API = ROOT / "docs" / "api"


def public_modules() -> set[str]:
    """Dotted names of the package's modules and subpackages whose names start with no underscore."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts):
            continue
        found.add(".".join(parts))
    return found


def documented() -> dict[str, str]:
    """Module -> the API page whose ``::: module`` block renders it."""
    pages = {}
    for page in sorted(API.glob("*.md")):
        for name in re.findall(r"^::: (\S+)\s*$", page.read_text(encoding="utf-8"), flags=re.MULTILINE):
            pages[name] = page.name
    return pages


def test_every_public_module_has_an_api_page():
    missing = sorted(public_modules() - set(documented()))
    assert not missing, f"no API page renders these modules: add a `::: module` block to a page of docs/api/: {missing}"


def test_api_pages_name_only_existing_modules():
    stale = sorted(set(documented()) - public_modules())
    assert not stale, f"docs/api/ renders modules that are gone or private: {stale}"


def test_every_api_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    absent = [p.name for p in API.glob("*.md") if f"api/{p.name}" not in nav]
    assert not absent, f"API pages missing from mkdocs.yml's nav: {absent}"
