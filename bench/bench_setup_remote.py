"""Benchmark: setup-remote over N lab hosts, first run and no-change re-run.

Prints a table: hosts, run, wall seconds, remote commands per host (each is one SSH
round trip: an exec channel and its answer), SSH connections per host (each costs a
TCP + SSH handshake + authentication), this client's CPU seconds and the whole machine's
busy CPU seconds (from /proc/stat). In the lab the "remote" sshds run on the client's own
cores, so the machine's CPU shows how much of a wall second is server work that a real
fleet would do on its own machines. Uses its own containers (prefix pullback-bench) and
removes them at the end.

    .venv/bin/python bench/bench_setup_remote.py [N ...]     # default: 1 5 20
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from roles import fleet, keys, lab, setup  # noqa: E402
from roles.connection import ROUND_TRIPS  # noqa: E402
from roles.inventory import load  # noqa: E402

PREFIX = "pullback-bench"
RERUNS = 3


def per_host(counts: dict[str, int], hosts: list[str]) -> str:
    values = [counts.get(h, 0) for h in hosts]
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"


def machine_busy() -> float:
    """CPU seconds every core of this machine spent busy so far (not idle or iowait)."""
    with open("/proc/stat") as stat:
        ticks = [int(x) for x in stat.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


CPU: dict[str, float] = {}


def run(hosts) -> tuple[float, list]:
    ROUND_TRIPS.reset()
    started, cpu, busy = time.perf_counter(), os.times(), machine_busy()
    outcomes = fleet.for_each(
        hosts, lambda h: setup.setup_host(h),
        lambda h, exc: setup.Outcome(h.name, {}, error=str(exc)), parallel=32,
    )
    elapsed = time.perf_counter() - started
    after = os.times()
    CPU["client"] = (after.user - cpu.user) + (after.system - cpu.system)
    CPU["machine"] = machine_busy() - busy
    failed = [o for o in outcomes if o.error]
    if failed:
        raise SystemExit(f"setup-remote failed: {failed[0].host}: {failed[0].error}")
    return elapsed, outcomes


def bench(count: int) -> list[tuple]:
    lab.down(PREFIX)
    lab_hosts = lab.up(count=count, prefix=PREFIX, log=lambda m: None)
    path = lab.write_inventory(lab_hosts, None, PREFIX)
    hosts = list(load(path).hosts.values())
    keys.ensure_backup_key(Path(hosts[0].backup_key))
    names = [h.name for h in hosts]
    rows = []
    elapsed, outcomes = run(hosts)
    assert all("changed" in o.steps.values() for o in outcomes)
    rows.append((count, "first run", f"{elapsed:.2f}", per_host(ROUND_TRIPS.counts, names),
                 per_host(ROUND_TRIPS.connections, names), f"{CPU['client']:.2f}",
                 f"{CPU['machine']:.2f}"))
    times = []
    for _ in range(RERUNS):
        elapsed, outcomes = run(hosts)
        assert all(set(o.steps.values()) == {"ok"} for o in outcomes), outcomes
        times.append(elapsed)
    rows.append((count, f"re-run (median of {RERUNS})", f"{statistics.median(times):.2f}",
                 per_host(ROUND_TRIPS.counts, names), per_host(ROUND_TRIPS.connections, names),
                 f"{CPU['client']:.2f}", f"{CPU['machine']:.2f}"))
    return rows


def main(argv: list[str]) -> None:
    counts = [int(a) for a in argv] or [1, 5, 20]
    rows = []
    try:
        for count in counts:
            rows += bench(count)
    finally:
        lab.down(PREFIX)
    print("| hosts | run | wall s | commands/host | connections/host | client CPU s "
          "| machine busy CPU s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
