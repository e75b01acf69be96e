"""Benchmark: fleet backup of N hosts with backup.parallel = 1, 4, 8.

Each lab host serves its /etc (about 500 files); every cell is a first pull into empty
destinations, through `invoke backup` (all hosts of the inventory).

    .venv/bin/python bench/bench_fleet.py [N ...]     # default: 1 5 20
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from common import INVOKE, provision, table, timed

from lab import hosts as lab

PREFIX = "pullback-bench-fleet"


def main(argv: list[str]) -> None:
    counts = [int(a) for a in argv] or [1, 5, 20]
    rows = []
    try:
        for count in counts:
            path, hosts = provision(PREFIX, count, source="/etc")
            row: list[object] = [count]
            for parallel in (1, 4, 8):
                text = path.read_text()
                path.write_text(re.sub(r"    parallel: \d+\n", "", text).replace(
                    "  backup:\n", f"  backup:\n    parallel: {parallel}\n", 1))

                def empty(hosts=hosts) -> None:
                    for h in hosts:
                        shutil.rmtree(h.destination, ignore_errors=True)
                        shutil.rmtree(h.destination + ".pullback", ignore_errors=True)
                        Path(h.destination).mkdir(parents=True, mode=0o700)

                row.append(f"{timed([INVOKE, 'backup', '--inventory', str(path)], empty):.2f}")
            rows.append(row)
    finally:
        lab.down(PREFIX)
    print(table(["hosts", "parallel=1 s", "parallel=4 s", "parallel=8 s"], rows))


if __name__ == "__main__":
    main(sys.argv[1:])
