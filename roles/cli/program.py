"""``pullback``: the tasks of ``tasks.py`` as a console command that works from any folder.

``invoke`` looks for ``tasks.py`` in the current folder and its parents, so it works only
inside the checkout. ``pullback`` is an invoke ``Program`` given the collection of the
project's own ``tasks.py``, found next to this package (the checkout that ``./dev setup``
installs into its venv, like the templates): ``pullback backup --inventory F`` is
``invoke backup --inventory F`` run from anywhere. Files named on the command line
(``--inventory``) are relative to the current folder, as with ``invoke``.

A flag it does not know, before or after the task name, exits 2 like any bad input.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from importlib import metadata
from pathlib import Path

from invoke import Collection, Program
from invoke.exceptions import Exit, ParseError

from roles.core.errors import EXIT_BAD_INPUT

TASKS = Path(__file__).resolve().parents[2] / "tasks.py"


def load_tasks(path: Path = TASKS) -> Collection:
    """The ``ns`` collection of ``path``; one line and exit 2 when it is missing."""
    if not path.is_file():
        print(f"pullback: {path} not found: pullback runs the tasks of the checkout it was "
              "installed from (`./dev setup` there)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)
    spec = importlib.util.spec_from_file_location("tasks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["tasks"] = module
    spec.loader.exec_module(module)
    return module.ns


class PullbackProgram(Program):
    """invoke's Program, with a parse error (an unknown flag, a missing value) exiting 2."""

    def parse_core(self, argv: list[str] | None) -> None:
        try:
            super().parse_core(argv)
        except ParseError as exc:
            raise Exit(str(exc), code=EXIT_BAD_INPUT) from None

    def parse_tasks(self) -> None:
        try:
            super().parse_tasks()
        except ParseError as exc:
            raise Exit(str(exc), code=EXIT_BAD_INPUT) from None


def main() -> None:
    program = PullbackProgram(name="pullback", binary="pullback", namespace=load_tasks(),
                              version=metadata.version("pullback"))
    try:
        program.run()
    except BrokenPipeError:  # `pullback doctor | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
