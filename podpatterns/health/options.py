"""Options shared by the health tools (declared once, like every option)."""

from __future__ import annotations

from typing import Any

from podpatterns.health.records import check_name
from podpatterns.options import Option, parse_str


def parse_name(text: str) -> str:
    """Parse a container name (a DNS label)."""
    return check_name(parse_str(text))


NAME_OPTION: Option[Any] = Option(
    "name",
    parse_name,
    None,
    "the container this record is about: it is HEALTH_DIR/NAME.json",
    metavar="NAME",
    scope="health",
)
