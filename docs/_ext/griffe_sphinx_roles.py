"""Griffe extension: render the Sphinx roles of podpatterns' docstrings as cross-references.

The docstrings are Google style but cross-reference with Sphinx roles
(``:class:`~podpatterns.runtime.Runtime```), which read well in ``help()`` and in an
editor. mkdocstrings renders Markdown, where a role would show as literal text; this
extension rewrites each role into an autorefs link before the docstring is parsed, and
turns the reST ``::`` that introduces an indented example into ``:``.

The links are *optional* autorefs: a target that is not on the site (a private module)
renders as plain code instead of failing the strict build.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):`(?P<tilde>~?)(?P<target>[^`]+)`")
_LITERAL_INTRO = re.compile(r"(?<=\S)::$", re.MULTILINE)


def _link(match: re.Match[str]) -> str:
    target = match["target"].strip()
    title = target.rsplit(".", 1)[-1] if match["tilde"] else target
    return f'<autoref identifier="{target}" optional>`{title}`</autoref>'


def rewrite(text: str) -> str:
    """A docstring with its Sphinx roles as autorefs and ``::`` as ``:``.

    Args:
        text: the docstring as written in the code.

    Returns:
        The Markdown for mkdocstrings.
    """
    return _LITERAL_INTRO.sub(":", _ROLE.sub(_link, text))


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring of the loaded package with :func:`rewrite`."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite the docstring of each object as it is created."""
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
