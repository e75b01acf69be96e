"""The host spec: one validated host of the inventory, as frozen dataclasses (standard
library only).

The inventory layer produces it two ways: ``roles.inventory.schema`` validates
``inventory.yaml`` with pydantic and converts each host (``spec_of``), and
``roles.inventory.compiled`` rebuilds it from its JSON cache (``HostSpec.from_dict``, no
pydantic). Validation stays in pydantic; everything else (features, core, the lean backup
path) reads a ``HostSpec``. The values computed from the fields (the rsync paths and URLs,
``pull_exclude``, ``destination``, ``backup_pubkey``) are defined here only, as properties;
the validator has no copy of them (what it must check before a spec exists goes through a
function of this module, ``destination_of``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from roles.core.hardened import Mode
from roles.core.rsync import anchored_excludes


def destination_of(destination: str, name: str) -> str:
    """A host's DEST: ``backup.destination`` as written, its ``{name}`` filled with the host's
    name (``HostSpec.destination``; the validator checks the same value before a spec
    exists)."""
    return destination.replace("{name}", name)


def _build(cls: type, data: dict[str, Any]) -> Any:
    """``cls`` from plain data: nested specs by ``cls.NESTED``, lists as tuples. An unknown
    or missing key is a TypeError (a stale cache entry, then validated again)."""
    nested: dict[str, type] = cls.NESTED  # type: ignore[attr-defined]
    values = {}
    for key, value in data.items():
        if key in nested:
            value = nested[key].from_dict(value)
        elif isinstance(value, list):
            value = tuple(value)
        values[key] = value
    return cls(**values)


@dataclass(frozen=True)
class RsyncSpec:
    """``rsync:``: the pinned release, where to fetch it, where it is installed on each end."""

    version: str
    allow_vulnerable: bool
    url: str
    mirrors: tuple[str, ...]
    sha256: str | None
    prefix: str
    local_prefix: str
    gpg_keyring: str | None

    NESTED: ClassVar[dict[str, type]] = {}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RsyncSpec:
        return _build(cls, data)

    @property
    def urls(self) -> list[str]:
        return [self.url, *self.mirrors]

    @property
    def remote_binary(self) -> str:
        return f"{self.prefix.rstrip('/')}/bin/rsync"

    @property
    def local_binary(self) -> str:
        return f"{self.local_prefix.rstrip('/')}/bin/rsync"


@dataclass(frozen=True)
class RetainSpec:
    """``backup.retain:``: the daily, weekly and monthly snapshots kept beside the newest N."""

    daily: int
    weekly: int
    monthly: int

    NESTED: ClassVar[dict[str, type]] = {}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetainSpec:
        return _build(cls, data)


@dataclass(frozen=True)
class BackupSpec:
    """``backup:``: what a pull copies, how, and where to."""

    source: str
    extra_sources: tuple[str, ...]   # below source, each pulled as well (-R, /./ markers)
    destination: str                 # as written, with {name}; HostSpec.destination fills it
    options: tuple[str, ...]         # what the pull runs: base, extra_options, --bwlimit
    extra_options: tuple[str, ...]
    bwlimit: int | None
    allow_inexact: bool
    exclude: tuple[str, ...]
    system_exclude: tuple[str, ...]
    snapshots: int
    module: str
    max_delete: int | None
    parallel: int
    max_age: float                   # hours
    allow_destination: str | None
    retain: RetainSpec
    pre: tuple[str, ...]
    post: tuple[str, ...]
    sandbox: bool
    own_unit: bool

    NESTED: ClassVar[dict[str, type]] = {"retain": RetainSpec}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackupSpec:
        return _build(cls, data)

    @property
    def pull_exclude(self) -> tuple[str, ...]:
        """Every ``--exclude`` of the pull: system_exclude below ``source`` (anchored at the
        transfer root), then ``exclude`` as written."""
        return (*anchored_excludes(self.system_exclude, self.source), *self.exclude)


@dataclass(frozen=True)
class MonitorSpec:
    """``monitor:``: where a run reports (a ping URL, a textfile-collector file)."""

    ping_url: str | None
    metrics_file: str | None

    NESTED: ClassVar[dict[str, type]] = {}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MonitorSpec:
        return _build(cls, data)


@dataclass(frozen=True)
class HostSpec:
    """One host of the inventory, merged with ``defaults:`` and validated."""

    name: str
    address: str
    port: int
    admin_user: str
    admin_key: str | None
    known_hosts: str
    backup_key: str
    from_: str | None                # the inventory's ``from``
    forced_command: Mode
    sudo_password: bool
    rsync: RsyncSpec
    backup: BackupSpec
    monitor: MonitorSpec

    NESTED: ClassVar[dict[str, type]] = {"rsync": RsyncSpec, "backup": BackupSpec,
                                         "monitor": MonitorSpec}

    def __post_init__(self) -> None:
        if not isinstance(self.forced_command, Mode):
            object.__setattr__(self, "forced_command", Mode(self.forced_command))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HostSpec:
        """The spec from ``to_dict``'s data (the compiled cache)."""
        return _build(cls, data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: every field, nested specs as mappings."""
        return dataclasses.asdict(self)

    @property
    def destination(self) -> str:
        return destination_of(self.backup.destination, self.name)

    @property
    def backup_pubkey(self) -> str:
        return self.backup_key + ".pub"
