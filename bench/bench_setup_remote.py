"""Benchmark: setup-remote over N lab hosts, first run and no-change re-run.

Prints a table: hosts, run, wall seconds, remote commands per host (each is one SSH
round trip: an exec channel and its answer), SSH connections per host (each costs a
TCP + SSH handshake + authentication), this client's CPU seconds, the whole machine's
busy CPU seconds (from /proc/stat), the lab servers' CPU seconds and the lower bound the
two imply. In the lab the "remote" sshds run on the client's own cores, so the machine's
CPU shows how much of a wall second is server work that a real fleet would do on its own
machines.

- servers CPU s: the sum over the N containers' cgroup CPU counters (cgroup v2
  ``cpu.stat`` usage_usec, else v1 ``cpuacct.usage``): sshd (handshake, authentication,
  PAM), the login shell, sudo and the fact script, read 0.2 s after the run so that each
  sshd's teardown counts too. The engine's own helpers (conmon, port forwarding) and the
  kernel's loopback networking are in neither this nor the client's column.
- lower bound s: (client CPU + servers CPU) / cores: the wall time if this run's own work
  were spread perfectly over every core of this machine. On a shared machine the busy
  CPU also holds other people's work; this bound counts only the run's.

For the re-run the row is the median run of three (its wall time and its CPU columns).
Uses its own containers (prefix pullback-bench) and removes them at the end.

    .venv/bin/python bench/bench_setup_remote.py [N ...]     # default: 1 5 20
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from roles.core.outcome import Outcome

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab import hosts as lab  # noqa: E402
from roles.core import fleet
from roles.features import setup_remote as setup
from roles.inventory.schema import load  # noqa: E402
from roles.local import keys
from roles.remote.session import Run as Sessions  # noqa: E402

PREFIX = "pullback-bench-setup"
RERUNS = 3
SETTLE = 0.2  # seconds for the sshds to finish closing before their counters are read


def per_host(counts: dict[str, int], hosts: list[str]) -> str:
    values = [counts.get(h, 0) for h in hosts]
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"


def machine_busy() -> float:
    """CPU seconds every core of this machine spent busy so far (not idle or iowait)."""
    with open("/proc/stat") as stat:
        ticks = [int(x) for x in stat.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else (os.cpu_count() or 1)


def _cgroup_mounts() -> dict[str, str]:
    """Mount points: "cgroup2" -> path, and each v1 controller ("cpuacct", ...) -> path."""
    mounts: dict[str, str] = {}
    with open("/proc/self/mountinfo") as info:
        for line in info:
            fields = line.split()
            sep = fields.index("-")
            fstype, options = fields[sep + 1], fields[sep + 3].split(",")
            if fstype == "cgroup2":
                mounts.setdefault("cgroup2", fields[4])
            elif fstype == "cgroup":
                for option in options:
                    mounts.setdefault(option, fields[4])
    return mounts


def cpu_counter(container: str) -> Path:
    """The file holding ``container``'s cumulative CPU time (its init process's cgroup)."""
    pid = lab.engine("inspect", "--format", "{{.State.Pid}}", container).stdout.decode().strip()
    mounts = _cgroup_mounts()
    with open(f"/proc/{pid}/cgroup") as groups:
        entries = [line.rstrip("\n").split(":", 2) for line in groups]
    for _, controllers, path in entries:
        if controllers == "" and "cgroup2" in mounts:
            counter = Path(mounts["cgroup2"] + path) / "cpu.stat"
            if counter.is_file():
                return counter
    for _, controllers, path in entries:
        if "cpuacct" in controllers.split(",") and "cpuacct" in mounts:
            counter = Path(mounts["cpuacct"] + path) / "cpuacct.usage"
            if counter.is_file():
                return counter
    raise SystemExit(f"{container}: no cgroup CPU counter found for pid {pid}")


def cpu_seconds(counter: Path) -> float:
    text = counter.read_text()
    if counter.name == "cpuacct.usage":
        return int(text) / 1e9
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value) / 1e6
    raise SystemExit(f"{counter}: no usage_usec")


@dataclass
class Run:
    wall: float
    client: float
    machine: float
    servers: float
    outcomes: list
    commands: dict[str, int]      # remote commands per host, this run
    connections: dict[str, int]   # SSH connections per host, this run

    @property
    def bound(self) -> float:
        return (self.client + self.servers) / cores()


def run(hosts, counters: list[Path]) -> Run:
    sessions = Sessions()  # one run of the task: its own counters
    servers = sum(cpu_seconds(c) for c in counters)
    started, cpu, busy = time.perf_counter(), os.times(), machine_busy()
    outcomes = fleet.for_each(
        hosts, lambda h: setup.setup_host(h, sessions=sessions),
        lambda h, exc: Outcome(h.name, {}, error=str(exc)), parallel=32,
    )
    elapsed = time.perf_counter() - started
    after = os.times()
    client = (after.user - cpu.user) + (after.system - cpu.system)
    machine = machine_busy() - busy
    time.sleep(SETTLE)
    servers = sum(cpu_seconds(c) for c in counters) - servers
    failed = [o for o in outcomes if o.error]
    if failed:
        raise SystemExit(f"setup-remote failed: {failed[0].host}: {failed[0].error}")
    return Run(elapsed, client, machine, servers, outcomes,
               dict(sessions.counters.round_trips), dict(sessions.counters.connections))


def row(count: int, label: str, result: Run, names: list[str]) -> tuple:
    return (count, label, f"{result.wall:.2f}", per_host(result.commands, names),
            per_host(result.connections, names), f"{result.client:.2f}",
            f"{result.machine:.2f}", f"{result.servers:.2f}", f"{result.bound:.2f}")


def bench(count: int) -> list[tuple]:
    lab.down(PREFIX)
    lab_hosts = lab.up(count=count, prefix=PREFIX, log=lambda m: None)
    path = lab.write_inventory(lab_hosts, None, PREFIX)
    hosts = list(load(path).hosts.values())
    keys.ensure_backup_key(Path(hosts[0].backup_key))
    names = [h.name for h in hosts]
    counters = [cpu_counter(h.name) for h in lab_hosts]
    rows = []
    first = run(hosts, counters)
    assert all("changed" in o.steps.values() for o in first.outcomes)
    rows.append(row(count, "first run", first, names))
    reruns = []
    for _ in range(RERUNS):
        result = run(hosts, counters)
        assert all(set(o.steps.values()) == {"ok"} for o in result.outcomes), result.outcomes
        reruns.append(result)
    median = sorted(reruns, key=lambda r: r.wall)[RERUNS // 2]  # with its own counts and CPU
    rows.append(row(count, f"re-run (median of {RERUNS})", median, names))
    return rows


def main(argv: list[str]) -> None:
    counts = [int(a) for a in argv] or [1, 5, 20]
    rows = []
    try:
        for count in counts:
            rows += bench(count)
    finally:
        lab.down(PREFIX)
    print(f"({cores()} cores; lower bound = (client + servers CPU) / {cores()})")
    print("| hosts | run | wall s | commands/host | connections/host | client CPU s "
          "| machine busy CPU s | servers CPU s | lower bound s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for line in rows:
        print("| " + " | ".join(str(v) for v in line) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
