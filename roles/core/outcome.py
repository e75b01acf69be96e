"""What a task did on one host, step by step: the shape every host task reports in."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Outcome:
    host: str
    steps: dict[str, str]
    error: str | None = None
    warnings: tuple[str, ...] = ()
    diffs: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        return self.error is not None
