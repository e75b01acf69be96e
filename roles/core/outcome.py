"""What a task did on one host, step by step, and what a check found: the shapes every host
task reports in. The enums are ``StrEnum``s: a member prints as its word, so the output is
the same words as ever, and code compares members, not strings."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    """What a step did to one thing on a host (or, in a dry run, would do)."""

    OK = "ok"                      # already as wanted: nothing done
    CHANGED = "changed"
    REMOVED = "removed"
    SKIPPED = "skipped"            # not applicable here (a reason is in the warnings)
    WRITTEN = "written"            # a record of ours, written every time
    WOULD_CHANGE = "would change"  # --dry-run's words for CHANGED and REMOVED
    WOULD_REMOVE = "would remove"
    # schedule's files on this machine speak of files: the same "nothing to do" and
    # "changed", in the words its output has always used.
    UNCHANGED = "unchanged"
    CREATED = "created"
    UPDATED = "updated"
    BUILT = "built"                # build-rsync: a new build installed (OK: it was there)

    def preview(self) -> State:
        """The word a dry run shows for this state."""
        return _PREVIEW.get(self, self)


_PREVIEW = {State.CHANGED: State.WOULD_CHANGE, State.REMOVED: State.WOULD_REMOVE}


@dataclass
class Outcome:
    host: str
    steps: dict[str, State]
    error: str | None = None
    warnings: tuple[str, ...] = ()
    diffs: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        return self.error is not None


class Trust(StrEnum):
    """What trust-host did with the key a host offers (the person's answer included)."""

    ADDED = "added"                # pinned in known_hosts now
    ALREADY = "already trusted"    # the same key was pinned: nothing written
    DECLINED = "declined"          # not confirmed: nothing written, the task exits 1
    REFUSED = "refused"            # another or a revoked key pinned, or no key: exits 1


class Level(StrEnum):
    """How bad a finding is; any ERROR makes the task exit 1."""

    OK = "ok"
    WARN = "warn"
    ERROR = "error"


@dataclass(frozen=True)
class Finding:
    """One check's result: what is wrong, why it breaks the backup, the fix (the last two
    empty for OK)."""

    check: str
    level: Level
    what: str
    why: str = ""
    fix: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.level, Level):
            raise ValueError(f"a finding's level is a Level, not {self.level!r}")

