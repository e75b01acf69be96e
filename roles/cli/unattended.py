"""``pullback-backup``: ``invoke backup`` for timers and cron jobs, without invoke.

The same pull (``roles.features.backup.pull_all``), options and exit codes as ``invoke backup``
(0 all good, 1 a host failed, 2 a bad inventory or selection), with a start-up that imports
neither invoke nor, once the inventory is compiled (``roles.inventory.compiled``), PyYAML and
pydantic: a no-change backup adds about 45 ms to rsync this way, against about 100 ms
through invoke (docs/performance.md).
``invoke schedule`` writes units and crontabs that run it.

Run as root (what the system-wide schedule does), it first refuses (exit 2) an inventory,
interpreter, virtualenv or package of its own that anyone but root could change, or a
folder above them that anyone but root could write (``roles.local.trust_paths``): that
user would get root at the next run. This check reads only file metadata (about 50 ms for a
virtualenv of 4,500 files); it cannot undo code that was already changed and imported, but
it stops the run before the inventory is read and names the fix.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from roles.features import backup
from roles.inventory import compiled, selection
from roles.local import trust_paths


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pullback-backup",
                                description="Pull / from each host with the backup key.")
    p.add_argument("--inventory", default="inventory.yaml",
                   help="inventory file (default: inventory.yaml)")
    p.add_argument("--host", action="append", default=[],
                   help="host name from the inventory; repeat for several (default: every "
                        "host)")
    p.add_argument("--shard", help="K/N: only the hosts of shard K of N")
    p.add_argument("--unit", metavar="INSTANCE",
                   help="a systemd instance (what pullback-backup@.service passes): K-N is "
                        "shard K of N without the hosts with backup.own_unit, else one host")
    p.add_argument("-n", "--dry-run", action="store_true",
                   help="rsync -n: show what would change")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if os.geteuid() == 0:
        # Root runs what the inventory names and the code of this virtualenv: refuse when
        # another user could change either (roles.core.root_trust).
        problem = trust_paths.root_job_problem(args.inventory)
        if problem is not None:
            print(f"pullback-backup: {problem}", file=sys.stderr)
            return 2
    if args.unit is not None and (args.host or args.shard):
        print("pullback-backup: --unit takes neither --host nor --shard", file=sys.stderr)
        return 2
    try:
        inventory = compiled.load(args.inventory)
        hosts = inventory.choose_unit(args.unit) if args.unit is not None \
            else inventory.choose(args.host, args.shard)
    except selection.InventoryError as exc:
        print(exc, file=sys.stderr)
        return 2
    bad = backup.pull_all(hosts, dry_run=args.dry_run, next_step=lambda host, task: shlex.join(
        ["pullback", task, "--inventory", args.inventory, "--host", host]))
    if bad:
        print(f"backup: {len(bad)} of {len(hosts)} host{'s' * (len(hosts) != 1)} failed",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
