"""``invoke restore-drill``: back up, restore into a fresh folder, compare with the server.

Three features in a row (backup, restore, drill's reads), so it lives above them: features
never import each other. Steps:

1. the normal backup of the host (``run_backup``, the backup key, the host's options);
2. ``restore`` of ``path`` (default ``backup.source``) into ``TO/tree`` (``TO`` new or
   empty, made 0700: the copy holds setuid-root files and device nodes);
3. the server's tree read as root over the admin login, the copy read here, both with
   ``roles.local.manifest``;
4. the comparison, one row per property; 0 differences is a pass.

The server keeps changing while this runs: a drill of a busy folder (``/var/log``) shows
those changes as differences. Drill a quiet one (``/etc``, ``/usr``) or a test host.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from roles.core.drill import Comparison
from roles.core.spec import HostSpec
from roles.features import backup, drill, restore
from roles.remote.session import Run


@dataclass
class DrillResult:
    host: str
    path: str
    target: str
    comparison: Comparison
    backup_seconds: float
    warnings: list[str]

    @property
    def ok(self) -> bool:
        return self.comparison.differences == 0


def run_drill(host: HostSpec, *, to: str, path: str | None = None,
              force: bool = False, sessions: Run | None = None) -> DrillResult:
    """Raise DrillError (or the backup's, restore's errors) when a step cannot run."""
    path = path or host.backup.source
    pulled = backup.run_backup(host, dry_run=False, tty=False)
    if not pulled.ok:
        raise drill.DrillError(f"the backup failed: {pulled.error} (log: {pulled.log_path})")
    warnings = [pulled.warning] if pulled.warning else []
    restored = restore.run_restore(host, path=path, to=to, force=force)
    if not restored.ok:
        raise drill.DrillError(f"the restore failed: {restored.error}")
    if restored.warning:
        warnings.append(restored.warning)
    with (sessions or Run()).open(host) as session:
        server = drill.gather_remote_manifest(session, path)
        server = drill.merge_manifests(server, [
            (place, drill.gather_remote_manifest(session, extra))
            for extra, place in drill.extra_roots(host, path)])
    copy = drill.gather_local_manifest(Path(restored.target))
    return DrillResult(host.name, path, restored.target,
                       drill.compare_trees(host, server, copy, path),
                       pulled.seconds, list(dict.fromkeys(warnings)))
