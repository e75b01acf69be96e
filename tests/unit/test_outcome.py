"""roles.core.outcome: the step states, trust-host's words and finding levels print as the
words the output has always used, and a finding takes only a Level."""

from __future__ import annotations

import json

import pytest

from roles.core.outcome import Finding, Level, State, Trust

WORDS = {
    State.OK: "ok", State.CHANGED: "changed", State.REMOVED: "removed",
    State.SKIPPED: "skipped", State.WRITTEN: "written", State.WOULD_CHANGE: "would change",
    State.WOULD_REMOVE: "would remove", State.UNCHANGED: "unchanged",
    State.CREATED: "created", State.UPDATED: "updated", State.BUILT: "built",
    Trust.ADDED: "added", Trust.ALREADY: "already trusted", Trust.DECLINED: "declined",
    Trust.REFUSED: "refused",
    Level.OK: "ok", Level.WARN: "warn", Level.ERROR: "error",
}


@pytest.mark.parametrize(("member", "word"), WORDS.items(), ids=lambda x: repr(x))
def test_a_member_prints_as_its_word(member, word):
    assert str(member) == word
    assert f"{member}" == word and f"{member:14}|" == f"{word:14}|"
    assert f"<{member:>6}>" == f"<{word:>6}>"
    assert json.dumps({"s": member}) == json.dumps({"s": word})


def test_every_member_is_listed():
    assert set(WORDS) == set(State) | set(Trust) | set(Level)


@pytest.mark.parametrize(("state", "shown"), [
    (State.CHANGED, "would change"), (State.REMOVED, "would remove"), (State.OK, "ok"),
    (State.SKIPPED, "skipped"),
])
def test_a_dry_run_shows_what_would_happen(state, shown):
    assert state.preview() == shown and isinstance(state.preview(), State)


@pytest.mark.parametrize("level", ["fatal", "error", None])
def test_a_finding_takes_only_a_level(level):
    with pytest.raises(ValueError, match="a finding's level is a Level"):
        Finding("x", level, "y")
    assert Finding("x", Level.ERROR, "y", "why", "fix").level is Level.ERROR
