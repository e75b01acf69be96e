"""The one base of pullback's errors: a one-line message and the exit code it means."""

from __future__ import annotations

# Exit codes of every task and of pullback-backup.
EXIT_FAILED = 1  # a host failed (or, for status, a backup is stale)
EXIT_BAD_INPUT = 2  # bad inventory or options: nothing was contacted or changed


class PullbackError(Exception):
    """An expected failure: ``str()`` is what the user reads, ``exit_code`` what the
    process returns. Anything else escaping a task is a bug."""

    exit_code = EXIT_FAILED
