"""Benchmark: setup-remote over N lab hosts, first run and no-change re-run, against its
floor (floor_setup_remote.py: one OpenSSH login and one ``sudo sh -s`` per host) measured in
the same run on N lab hosts of its own.

Prints a table: hosts, run, wall seconds, remote commands per host (each is one SSH
round trip: an exec channel and its answer), SSH connections per host (login attempts:
each costs a TCP + SSH handshake + authentication, except one refused while sshd
re-executes after the reload, which is answered at once), this client's CPU seconds,
the whole machine's busy CPU seconds (from /proc/stat), the lab servers' CPU seconds and
the lower bound the two imply. In the lab the "remote" sshds run on the client's own
cores, so the machine's CPU shows how much of a wall second is server work that a real
fleet would do on its own machines.

- servers CPU s: the sum over the N containers' cgroup CPU counters (cgroup v2
  ``cpu.stat`` usage_usec, else v1 ``cpuacct.usage``): sshd (handshake, authentication,
  PAM), the login shell, sudo and the fact script, read 0.2 s after the run so that each
  sshd's teardown counts too. The engine's own helpers (conmon, port forwarding) and the
  kernel's loopback networking are in neither this nor the client's column.
- lower bound s: (client CPU + servers CPU) / cores: the wall time if this run's own work
  were spread perfectly over every core of this machine. On a shared machine the busy
  CPU also holds other people's work; this bound counts only the run's.

For the re-run the row is the median run of three (its wall time and its CPU columns);
the floor's re-runs alternate with setup-remote's. The floor's client CPU is its ssh
processes' (children) CPU. "x floor" is the wall time over the floor's in the same run.
Uses its own containers (prefix pullback-bench) and removes them at the end.

    .venv/bin/python bench/bench_setup_remote.py [N ...]     # default: 1 5 20
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from roles.core.outcome import Outcome, State

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import floor_setup_remote as floor  # noqa: E402

from lab import hosts as lab  # noqa: E402
from roles.core import fleet
from roles.features import setup_remote as setup
from roles.inventory.schema import load  # noqa: E402
from roles.local import keys
from roles.remote.session import Run as Sessions  # noqa: E402

PREFIX = f"pullback-bench-setup-{os.getpid()}"  # its own: never another run's containers
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


def measure(work, counters: list[Path]) -> tuple[float, float, float, float, object]:
    """Wall, client CPU (this process and its children), machine busy and servers' CPU."""
    servers = sum(cpu_seconds(c) for c in counters)
    started, cpu, busy = time.perf_counter(), os.times(), machine_busy()
    result = work()
    elapsed = time.perf_counter() - started
    after = os.times()
    client = sum(getattr(after, f) - getattr(cpu, f)
                 for f in ("user", "system", "children_user", "children_system"))
    machine = machine_busy() - busy
    time.sleep(SETTLE)
    servers = sum(cpu_seconds(c) for c in counters) - servers
    return elapsed, client, machine, servers, result


def run(hosts, counters: list[Path]) -> Run:
    sessions = Sessions()  # one run of the task: its own counters
    elapsed, client, machine, servers, outcomes = measure(lambda: fleet.for_each(
        hosts, lambda h: setup.setup_host(h, sessions=sessions),
        lambda h, exc: Outcome(h.name, {}, error=str(exc)), parallel=32,
    ), counters)
    failed = [o for o in outcomes if o.error]
    if failed:
        raise SystemExit(f"setup-remote failed: {failed[0].host}: {failed[0].error}")
    return Run(elapsed, client, machine, servers, outcomes,
               dict(sessions.counters.round_trips), dict(sessions.counters.connections))


def run_floor(jobs: list[floor.Job], counters: list[Path]) -> Run:
    elapsed, client, machine, servers, _ = measure(lambda: floor.run(jobs), counters)
    names = {j.host.name: 1 for j in jobs}
    return Run(elapsed, client, machine, servers, [], names, names)


def median(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.wall)[len(runs) // 2]  # with its own counts and CPU


def row(count: int, label: str, result: Run, names: list[str], base: Run) -> tuple:
    return (count, label, f"{result.wall:.2f}", f"{result.wall / base.wall:.2f}",
            per_host(result.commands, names), per_host(result.connections, names),
            f"{result.client:.2f}", f"{result.machine:.2f}", f"{result.servers:.2f}",
            f"{result.bound:.2f}")


def bench(count: int) -> list[tuple]:
    lab.down(PREFIX)
    lab_hosts = lab.up(count=2 * count, prefix=PREFIX, log=lambda m: None)
    path = lab.write_inventory(lab_hosts, None, PREFIX)
    every = list(load(path).hosts.values())
    keys.ensure_backup_key(Path(every[0].backup_key))
    hosts, floor_hosts = every[:count], every[count:]  # fresh hosts for each side
    names, floor_names = [h.name for h in hosts], [h.name for h in floor_hosts]
    counters = [cpu_counter(name) for name in names]
    floor_counters = [cpu_counter(name) for name in floor_names]

    floor_first = run_floor(floor.first_run_jobs(floor_hosts), floor_counters)
    first = run(hosts, counters)
    assert all(State.CHANGED in o.steps.values() for o in first.outcomes)
    rerun_jobs = floor.rerun_jobs(floor_hosts)
    reruns, floor_reruns = [], []
    for _ in range(RERUNS):  # alternating, so that both see the same machine
        floor_reruns.append(run_floor(rerun_jobs, floor_counters))
        result = run(hosts, counters)
        assert all(set(o.steps.values()) == {State.OK} for o in result.outcomes), result.outcomes
        reruns.append(result)
    floor_rerun, rerun = median(floor_reruns), median(reruns)
    label = f"re-run (median of {RERUNS})"
    return [row(count, "first run", first, names, floor_first),
            row(count, "first run: floor", floor_first, floor_names, floor_first),
            row(count, label, rerun, names, floor_rerun),
            row(count, f"{label}: floor", floor_rerun, floor_names, floor_rerun)]


def main(argv: list[str]) -> None:
    counts = [int(a) for a in argv] or [1, 5, 20]
    rows = []
    try:
        for count in counts:
            rows += bench(count)
    finally:
        lab.down(PREFIX)
    print(f"({cores()} cores; lower bound = (client + servers CPU) / {cores()})")
    print("| hosts | run | wall s | x floor | commands/host | connections/host | client CPU s "
          "| machine busy CPU s | servers CPU s | lower bound s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for line in rows:
        print("| " + " | ".join(str(v) for v in line) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
