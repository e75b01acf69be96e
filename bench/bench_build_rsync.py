"""Benchmark: build-rsync on both ends at once versus one end alone, and the no-op re-run.

Uses a lab host and the lab's loopback mirror (rsync 3.2.7 from Debian's source archive).
Each build starts from nothing: the local prefix and the host's prefix are wiped first.

    .venv/bin/python bench/bench_build_rsync.py
"""

from __future__ import annotations

import shutil
import time

from common import INVOKE, exec_root, table, timed

from roles import lab
from roles.inventory import load

PREFIX = "pullback-bench-build"


def main() -> None:
    try:
        lab_hosts = lab.up(count=1, prefix=PREFIX, log=lambda m: None)
        port = lab.start_mirror(PREFIX)
        path = lab.write_inventory(lab_hosts, port, PREFIX)
        host = next(iter(load(path).hosts.values()))
        base = [INVOKE, "build-rsync", "--inventory", str(path)]

        def wipe() -> None:
            shutil.rmtree(host.rsync.local_prefix, ignore_errors=True)
            exec_root(host.name, "rm -rf /usr/local/bin/rsync /usr/local/share/pullback")

        timed(base + ["--local-only"])  # fills the download cache once
        rows = []
        results = {}
        for label, extra in (("local end only", ["--local-only"]),
                             ("remote end only", ["--remote-only"]),
                             ("both ends at once", [])):
            results[label] = timed(base + extra, wipe)
            rows.append([label, f"{results[label]:.1f}"])
        started = time.perf_counter()
        timed(base)
        rows.append(["no-op re-run (both ends)", f"{time.perf_counter() - started:.2f}"])
        one = max(results["local end only"], results["remote end only"])
        rows.append(["ratio both / slower single end", f"{results['both ends at once'] / one:.2f}"])
        print(table(["build-rsync 3.2.7", "wall s"], rows))
    finally:
        lab.down(PREFIX)


if __name__ == "__main__":
    main()
