"""``invoke check-inventory``: everything about an inventory that can be checked here, without
connecting to any host (like ``rsnapshot configtest`` and ``borgmatic config validate``).

Loading validates the schema and the destination rules (``roles.inventory.schema``); then,
per host, what a task would otherwise stop at later, read from this machine only:

- the backup key exists, is a regular file that nobody but its owner can read, and has its
  ``.pub`` (setup-remote installs that); an ``admin_key`` likewise;
- ``known_hosts`` exists and pins a key for the host's ``[address]:port`` (``ssh-keygen
  -F``, hashed entries included);
- every folder on the way to the destination is safe (``roles.local.folders``);
- the rsync version policy: a sum for ``rsync.version`` (pinned or ``rsync.sha256``), no
  client build older than 3.4.1 without ``rsync.allow_vulnerable``, and the local rsync a
  backup would run (the pinned build, else PATH's) passes the same rule;
- ``max_delete: 0`` with a local rsync before 3.0.0; in captured mode, a capture record
  that matches the current settings.

It lives above the features because it reads two of them (build-rsync's pins, backup's
local rsync): features never import each other.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from roles.core.errors import PullbackError
from roles.core.hardened import Mode
from roles.core.pull import max_delete_problem
from roles.core.spec import HostSpec
from roles.features import rsync_build
from roles.local import capture_record, folders, keys, runner
from roles.remote.hostkeys import known_hosts_name


@dataclass
class HostCheck:
    host: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_key(path: str, what: str) -> str | None:
    try:
        keys.check_private_key(Path(path))
    except keys.KeyFileError as exc:
        return f"{what}: {exc}"
    return None


def check_known_hosts(host: HostSpec) -> str | None:
    path = Path(host.known_hosts)
    name = known_hosts_name(host.address, host.port)
    if not path.is_file():
        return (f"known_hosts {path} does not exist: run `invoke trust-host --host "
                f"{host.name}`")
    found = subprocess.run(["ssh-keygen", "-F", name, "-f", str(path)], capture_output=True,
                           check=False, stdin=subprocess.DEVNULL, timeout=30)
    if found.returncode != 0:
        return (f"known_hosts {path} has no key for {name}: run `invoke trust-host --host "
                f"{host.name}`")
    return None


def check_rsync(host: HostSpec, result: HostCheck) -> None:
    try:
        rsync_build.expected_sha256(host.rsync.version, host.rsync.sha256)
    except ValueError as exc:
        result.problems.append(str(exc))
    result.problems += rsync_build.client_build_refusals([host])
    try:
        local, warning = runner.find_local_rsync(host)
    except PullbackError as exc:
        result.problems.append(str(exc))
        return
    if warning:
        result.warnings.append(warning)
    version = runner.local_rsync_version(host, local)
    for problem in (runner.refuse_exposed_client(host, local, version),
                    max_delete_problem(host.backup.max_delete, version)):
        if problem:
            result.problems.append(problem)
    if host.forced_command == Mode.CAPTURED:
        try:
            capture_record.require_record(host, local)
        except PullbackError as exc:
            result.problems.append(str(exc))


def check_host(host: HostSpec) -> HostCheck:
    """Every local check of ``host``; nothing is contacted, created or changed."""
    result = HostCheck(host.name)
    backup_key = check_key(host.backup_key, "backup_key")
    result.problems += [p for p in (
        backup_key,
        None if backup_key or Path(host.backup_pubkey).is_file() else
        f"backup_key: {host.backup_pubkey} does not exist: create the pair with `invoke keygen`",
        check_key(host.admin_key, "admin_key") if host.admin_key else None,
        check_known_hosts(host),
    ) if p]
    try:
        folders.check_folder(host.destination.rstrip("/"))
    except folders.FolderError as exc:
        result.problems.append(f"backup.destination: {exc}")
    check_rsync(host, result)
    return result
