"""mkdocs hooks for the podpatterns site.

``docs/changelog.md`` includes ``CHANGELOG.md`` from the repository root with
pymdownx.snippets. Links in that file are written relative to the root
(``docs/health.md``), which is right on GitHub; on the site the page lives in docs/, so
the link must be ``health.md``. A Markdown preprocessor that runs right after snippets
(priority 32) drops the ``docs/`` prefix from relative links. A page in docs/ never
links to ``docs/...`` itself (that link would be broken on GitHub), so only included
root files are affected; any other broken link still fails the strict build.
"""

from __future__ import annotations

import re
from typing import Any

from markdown import Extension, Markdown
from markdown.preprocessors import Preprocessor

_ROOT_DOCS_LINK = re.compile(r"\]\(docs/(?=[^)\s]+\))")


class _RootLinks(Preprocessor):
    def run(self, lines: list[str]) -> list[str]:
        return [_ROOT_DOCS_LINK.sub("](", line) for line in lines]


class RootLinks(Extension):
    """Rewrite ``](docs/x.md)`` to ``](x.md)`` after snippets were included."""

    def extendMarkdown(self, md: Markdown) -> None:  # the name is Markdown's API
        md.preprocessors.register(_RootLinks(md), "podpatterns_root_links", 31)


def on_config(config: Any, **kwargs: Any) -> Any:
    """Add :class:`RootLinks` to the Markdown extensions of every page."""
    config.markdown_extensions.append(RootLinks())
    return config
