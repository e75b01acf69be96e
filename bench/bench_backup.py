"""Benchmark: `invoke backup` versus the raw rsync command with the identical argv.

A lab host gets a tree of 10,000 files / about 1 GB (9,900 files of 4 KiB and 100 of
10 MiB, random bytes); both pull it in daemon mode: first pull (empty destination) and
no-change re-pull, median of N runs each. The ratio toolkit/raw is what pullback adds
(Python and invoke start-up, the lock, the summary). Own containers, removed at the end.

    .venv/bin/python bench/bench_backup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from common import INVOKE, exec_root, median, provision, table, timed

from roles import backup, lab

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
        path, hosts = provision(PREFIX, 1, source="/srv/bench")
        host = hosts[0]
        exec_root(host.name, SEED)
        dest = Path(host.destination)
        local_rsync, _ = backup.find_local_rsync(host)
        raw = backup.build_argv(host, dry_run=False, tty=False, local_rsync=local_rsync,
                                dest=str(dest))
        toolkit = [INVOKE, "backup", "--inventory", str(path)]

        def empty() -> None:
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True, mode=0o700)

        rows = []
        for label, before in (("first pull", empty), ("no-change re-pull", None)):
            if before is None:
                timed(raw)  # make sure the destination is complete
            t_tool = [timed(toolkit, before) for _ in range(args.runs)]
            t_raw = [timed(raw, before) for _ in range(args.runs)]
            tool, rawm = median(t_tool), median(t_raw)
            rows.append([label, f"{tool:.2f}", f"{rawm:.2f}", f"{tool / rawm:.3f}"])
        print(f"argv: {' '.join(raw[:3])} ... {' '.join(raw[-2:])}")
        print(table(["run", f"toolkit s (median of {args.runs})",
                     f"raw rsync s (median of {args.runs})", "ratio"], rows))
    finally:
        lab.down(PREFIX)


if __name__ == "__main__":
    main()
