"""A loaded inventory: its hosts (``HostSpec``, as validated), and the selection of hosts a
task works on.

Shared by both loaders (``schema``: YAML + pydantic; ``compiled``: the JSON cache), so that
neither imports the other at start-up.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from roles.core.errors import EXIT_BAD_INPUT, PullbackError
from roles.core.shards import parse_instance, parse_shard, shard_of
from roles.core.spec import HostSpec


class InventoryError(PullbackError):
    """One or more problems in an inventory; ``str()`` gives one line per problem."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Inventory:
    path: Path
    hosts: dict[str, HostSpec]  # name -> the validated host

    def select(self, names: Iterable[str] | None,
               shard: tuple[int, int] | None = None) -> list[HostSpec]:
        """The hosts named (in inventory order), or every host when none are named.

        ``shard=(K, N)`` keeps only the hosts of shard K of N (see ``shard_of``).
        """
        wanted = list(names or [])
        if not wanted:
            return [h for h in self.hosts.values()
                    if shard is None or shard_of(h.name, shard[1]) == shard[0]]
        unknown = [n for n in wanted if n not in self.hosts]
        if unknown:
            known = ", ".join(self.hosts) or "(none)"
            raise InventoryError(
                [f"{self.path}: unknown host {', '.join(unknown)} (known: {known})"]
            )
        return [self.hosts[n] for n in self.hosts if n in wanted
                and (shard is None or shard_of(n, shard[1]) == shard[0])]

    def choose(self, names: Iterable[str] | None, shard: str | None) -> list[HostSpec]:
        """``select`` for the command line: ``shard`` as typed (``K/N``); an unknown host,
        a bad shard or an empty selection raise InventoryError (one line)."""
        try:
            selected = self.select(names, parse_shard(shard) if shard else None)
        except ValueError as exc:
            raise InventoryError([str(exc)]) from None
        if not selected:
            raise InventoryError([f"no host of {self.path} is in shard {shard}"])
        return selected


    def choose_unit(self, instance: str) -> list[HostSpec]:
        """The hosts of a systemd instance (``pullback-backup@INSTANCE``): ``K-N`` is shard K
        of N without the hosts that have their own unit (``backup.own_unit``); anything
        else names one host. InventoryError (one line) for an unknown host or empty shard."""
        try:
            shard = parse_instance(instance)
        except ValueError as exc:
            raise InventoryError([str(exc)]) from None
        if shard is None:
            return self.select([instance])
        chosen = [h for h in self.select(None, shard) if not h.backup.own_unit]
        if not chosen:
            raise InventoryError([f"no host of {self.path} is in shard {shard[0]}/{shard[1]} "
                                  "without a unit of its own (backup.own_unit)"])
        return chosen


def read_inventory(path: Path) -> bytes:
    """The inventory's bytes, checked to be UTF-8 (a bad byte is reported by line)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InventoryError([f"{path}: inventory file not found"]) from None
    except OSError as exc:
        raise InventoryError([f"{path}: cannot read inventory: {exc.strerror or exc}"]
                             ) from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InventoryError([f"{path}:{line}: not UTF-8: byte 0x{data[exc.start]:02x} at "
                              f"column {column} (save the file as UTF-8)"]) from None
    return data
