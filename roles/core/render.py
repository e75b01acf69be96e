"""One jinja2 environment for every file pullback writes.

StrictUndefined turns a missing variable into an error instead of an empty string, and
keep_trailing_newline keeps rendered files byte-identical to what the template says.
Values are validated in Python before they reach a template; templates hold no logic
beyond ``if``/``for``.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import jinja2

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


@cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 - config files, not HTML
    )


def render(name: str, **values: object) -> str:
    """Render ``templates/<name>`` with ``values``."""
    return environment().get_template(name).render(**values)
