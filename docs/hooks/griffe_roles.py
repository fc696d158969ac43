"""A griffe extension for the API pages: the suite's docstrings are Markdown-friendly prose
with a few Sphinx habits. This turns them into Markdown before mkdocstrings renders them.

* ``:func:`name```, ``:class:`~pkg.Name```, ``:mod:`...``` and the other roles become a code
  span, linked to the object's API entry when the name resolves in the docstring's scope
  (an optional cross-reference: nothing fails when the target has no entry, e.g. a private
  object);
* a paragraph ending in ``::`` (a reST literal block follows) ends in ``:`` instead.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|obj|exc):`(~?)([^`]+)`")
_LITERAL = re.compile(r"(\S)::(\n\n)")


def _target(obj: griffe.Object, name: str) -> str | None:
    """The full path ``name`` refers to from ``obj``'s docstring, or None."""
    if name.startswith("."):  # relative to the module's package: .run.STAGES, ..models.hooks
        module = obj if obj.is_module else obj.module
        package = module if module.is_package else module.parent
        stripped = name.lstrip(".")
        for _ in range(len(name) - len(stripped) - 1):
            package = package.parent if package is not None else None
        return f"{package.path}.{stripped}" if package is not None else None
    if name.startswith("suffix_analysis."):
        return name
    head, _, rest = name.partition(".")
    try:
        resolved = obj.resolve(head)
    except Exception:  # griffe's NameResolutionError, or an alias it cannot follow
        try:
            resolved = obj.module.resolve(head)
        except Exception:
            return None
    return f"{resolved}.{rest}" if rest else resolved


def _rewrite(obj: griffe.Object, text: str) -> str:
    def role(match: re.Match) -> str:
        short, name = match.group(1), match.group(2)
        shown = name.rsplit(".", 1)[-1] if short else name.lstrip(".")
        target = _target(obj, name)
        if target is None:
            return f"`{shown}`"
        return f'<autoref identifier="{target}" optional><code>{shown}</code></autoref>'

    return _LITERAL.sub(r"\1:\2", _ROLE.sub(role, text))


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring of the loaded package once it is fully loaded (so names resolve)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        seen: set[int] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(obj, obj.docstring.value)
            stack.extend(member for member in obj.members.values() if not member.is_alias)
