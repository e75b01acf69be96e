"""Benchmark: the backup versus the raw rsync command with the identical argv.

A lab host gets a tree of 10,000 files / about 1 GB (9,900 files of 4 KiB and 100 of
10 MiB, random bytes); each pulls it in daemon mode: first pull (empty destination) and
no-change re-pull, median of N runs each, interleaved. Toolkit: ``pullback-backup`` (what
``invoke schedule`` runs) and ``invoke backup``, both with the rsync sandbox (bubblewrap,
``backup.sandbox``, the default), and ``pullback-backup`` with ``backup.sandbox: false``;
and the raw argv inside the same sandbox (``raw in bwrap``). The ratio toolkit/raw is what
pullback adds (interpreter and imports, the lock, the log, the summary, the sandbox).
Bytecode caches are on, as in any install (``PYTHONDONTWRITEBYTECODE`` is cleared for the
runs, and one warm-up run writes them). Own containers, removed at the end.

    .venv/bin/python bench/bench_backup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from common import INVOKE, exec_root, median, provision, table, timed

from lab import hosts as lab
from roles.core import pull
from roles.local import runner, store

PREFIX = "pullback-bench-backup"
SEED = r"""
set -e
mkdir -p /srv/bench/small /srv/bench/big
cd /srv/bench/small
i=0
while [ $i -lt 100 ]; do
  mkdir -p d$i
  head -c 405504 /dev/urandom | split -b 4096 -a 3 - d$i/f
  i=$((i+1))
done
cd /srv/bench/big
i=0
while [ $i -lt 100 ]; do head -c 10485760 /dev/urandom > f$i; i=$((i+1)); done
find /srv/bench -type f | wc -l
du -sh /srv/bench
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    try:
        # Mirror mode: the raw argv pulls into the same DEST/tree (a snapshot run would
        # make a new hard-linked tree each time, which the raw command does not).
        path, hosts = provision(PREFIX, 1, source="/srv/bench", snapshots=0)
        host = hosts[0]
        exec_root(host.name, SEED)
        dest = Path(host.destination)
        local_rsync, _ = runner.find_local_rsync(host)
        # The same pull into the same place as the toolkit's: the mirror is DEST/tree.
        raw = pull.build_argv(host, dry_run=False, tty=False, local_rsync=local_rsync,
                                dest=str(dest / store.TREE))
        dest.mkdir(parents=True, mode=0o700, exist_ok=True)  # bound only when it exists
        in_bwrap = runner.pull_sandboxed(
            host, pull.build_argv(host, dry_run=False, tty=False, local_rsync=local_rsync,
                                  dest=str(dest / store.TREE), sandboxed=True),
            runner.find_bwrap(host))
        unsandboxed = path.with_name("inventory-no-sandbox.yaml")
        unsandboxed.write_text(path.read_text().replace("  backup:\n",
                                                        "  backup:\n    sandbox: false\n", 1))
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        program = str(Path(sys.executable).parent / "pullback-backup")
        tools = {
            "raw in bwrap": in_bwrap,
            "pullback-backup": [program, "--inventory", str(path)],
            "pullback-backup no sandbox": [program, "--inventory", str(unsandboxed)],
            "invoke backup": [INVOKE, "backup", "--inventory", str(path)],
        }

        def empty() -> None:
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True, mode=0o700)

        rows = []
        for label, before in (("first pull", empty), ("no-change re-pull", None)):
            if before is None:
                timed(raw)  # make sure the destination is complete
                for argv in tools.values():
                    timed(argv)  # warm-up: bytecode caches, the compiled inventory
            times: dict[str, list[float]] = {"raw": [], **{name: [] for name in tools}}
            for _ in range(args.runs):  # interleaved: drift on the machine hits all alike
                times["raw"].append(timed(raw, before))
                for name, argv in tools.items():
                    times[name].append(timed(argv, before))
            rawm = median(times["raw"])
            row: list[object] = [label, f"{rawm:.3f}"]
            for name in tools:
                m = median(times[name])
                row += [f"{m:.3f}", f"{m / rawm:.3f}"]
            rows.append(row)
        # The sandbox's own start-up, without rsync: bwrap around /bin/true, 50 runs each.
        true_in_bwrap = runner.pull_sandboxed(host, ["/bin/true"], runner.find_bwrap(host))
        bare = median([timed(["/bin/true"]) for _ in range(50)])
        boxed = median([timed(true_in_bwrap) for _ in range(50)])
        print(f"sandbox start-up: /bin/true {bare * 1000:.1f} ms, in bwrap "
              f"{boxed * 1000:.1f} ms (median of 50)")
        print(f"argv: {' '.join(raw[:3])} ... {' '.join(raw[-2:])}")
        header = ["run", f"raw rsync s (median of {args.runs})"]
        for name in tools:
            header += [f"{name} s", f"{name} ratio"]
        print(table(header, rows))
    finally:
        lab.down(PREFIX)


if __name__ == "__main__":
    main()
