"""One jinja2 environment for every file pullback writes.

StrictUndefined turns a missing variable into an error instead of an empty string, and
keep_trailing_newline keeps rendered files byte-identical to what the template says.
Values are validated in Python before they reach a template; templates hold no logic
beyond ``if``/``for``.

Shell scripts (``templates/scripts/*.sh.j2``, each sent to a host and run there) quote
every value with the ``shquote`` filter (``shlex.quote``) or ``shjoin`` (``shlex.join``, a
list of words); ``tests/unit/test_scripts.py`` renders each one and runs shellcheck on it.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import jinja2

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


def shquote(value: object) -> str:
    """One shell word, whatever ``value`` holds (``shlex.quote`` of its text)."""
    return shlex.quote(str(value))


def shjoin(values: Iterable[object]) -> str:
    """Shell words separated by spaces (``shlex.join``)."""
    return shlex.join(str(v) for v in values)


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 - config files and scripts, not HTML
    )
    env.filters["shquote"] = shquote
    env.filters["shjoin"] = shjoin
    return env


def render(name: str, **values: object) -> str:
    """Render ``templates/<name>`` with ``values``."""
    return environment().get_template(name).render(**values)
