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
from pathlib import Path
from typing import Any

from invoke import Collection, Program, Task
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


class PullbackTask(Task):
    """A task whose short flags mean one thing everywhere: ``-h`` is help, ``-n`` is
    ``--dry-run`` in every task that has one, and nothing else has a short flag (invoke's
    automatic ones gave ``-h`` to ``--host`` and ``-n``, ``-v`` to whatever came first).
    ``tasks.py`` makes every task with it."""

    SHORT = {"dry_run": "n"}

    def arg_opts(self, name: str, default: Any, taken_names: set[str]) -> dict[str, Any]:
        opts = super().arg_opts(name, default, taken_names)
        if name in self.SHORT:
            opts["names"] = [*opts["names"], self.SHORT[name]]
        return opts


def exit_2_on_parse_errors(program: type[Program]) -> None:
    """Bad input exits 2 (docs/tasks.md), and an unknown flag or a missing value is bad
    input; invoke's ``Program`` exits 1 for them. ``tasks.py`` calls this on invoke's own
    ``Program`` when it is loaded, which is before the task's flags are parsed: ``invoke``
    exits 2 for them too. ``PullbackProgram`` also covers the flags before the task name."""
    if getattr(program.parse_tasks, "pullback", False):
        return
    parse_tasks = program.parse_tasks

    def parse(self: Program) -> None:
        try:
            parse_tasks(self)
        except ParseError as exc:
            raise Exit(str(exc), code=EXIT_BAD_INPUT) from None

    parse.pullback = True  # type: ignore[attr-defined]
    program.parse_tasks = parse  # type: ignore[method-assign]


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
    from importlib import metadata  # here: tasks.py imports this module for every task

    program = PullbackProgram(name="pullback", binary="pullback", namespace=load_tasks(),
                              version=metadata.version("pullback"))
    try:
        program.run()
    except BrokenPipeError:  # `pullback doctor | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
