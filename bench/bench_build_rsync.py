"""Benchmark: build-rsync on both ends at once versus one end alone, and the no-op re-run.

Uses a lab host and the lab's loopback mirror (rsync 3.2.7 from Debian's source archive).
Each build starts from nothing: the local prefix and the host's prefix are wiped first.

Two CPU layouts, one column each:
- shared: the lab host and the local build use the same CPUs (all of this machine's), so
  two ``make -jN`` compete for them when both ends build at once;
- partitioned: emulates two machines. The lab container gets the upper half of the CPUs
  (``--cpuset-cpus``) and this process the lower half (``sched_setaffinity``; the invoke
  run and its compilers inherit it), so "one end alone" and "both at once" use the same
  CPUs per end. ``nproc`` reports each end's share, and the toolkit's ``make -j`` follows
  ``nproc``: the table shows both, read back from each end's build log.

    .venv/bin/python bench/bench_build_rsync.py                      # both layouts
    .venv/bin/python bench/bench_build_rsync.py --layout partitioned --repeat 3
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import INVOKE, exec_root, table

from lab import hosts as lab
from roles.core.spec import HostSpec
from roles.inventory.schema import load

PREFIX = "pullback-bench-build"
RUNS: dict[str, list[str]] = {
    "local end only": ["--local-only"],
    "remote end only": ["--remote-only"],
    "both ends at once": [],
}
# build-rsync's per-end progress lines ("local: make: ok in 5.9 s", "HOST: building rsync
# 3.2.7 in DIR (log: PATH)") and the command line each phase writes into the build log.
_PHASE = re.compile(r"^(?P<end>\S+): (?P<phase>configure|make): ok in (?P<s>[\d.]+) s$", re.M)
_LOG = re.compile(r"^(?P<end>\S+): building rsync \S+ in \S+ \(log: (?P<path>/\S+)\)$", re.M)
_MAKE_J = re.compile(r"^=== make -j(\d+)$", re.M)
NOISE_CPU_S = 1.0  # other work's CPU seconds in one run above which the numbers are suspect


@dataclass(frozen=True)
class Layout:
    label: str
    local_cpus: frozenset[int] | None  # None: not pinned
    cpuset: str | None  # the lab container's --cpuset-cpus; None: all CPUs


@dataclass
class Measured:
    wall: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    noop: list[float] = field(default_factory=list)
    # (run label, "local" | "remote", "configure" | "make") -> seconds, one per repeat
    phases: dict[tuple[str, str, str], list[float]] = field(
        default_factory=lambda: defaultdict(list))
    nproc: dict[str, int] = field(default_factory=dict)  # "local" | "remote" -> nproc
    jobs: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))  # make -jN
    # CPU seconds the machine spent on anything but this benchmark and its lab host, per
    # timed run: other people's work on a shared machine, which skews the wall times.
    other_cpu: list[float] = field(default_factory=list)


def cpu_list(cpus: list[int]) -> str:
    return ",".join(str(c) for c in cpus)


def layouts(which: str) -> list[Layout]:
    cpus = sorted(os.sched_getaffinity(0))
    chosen: list[Layout] = []
    if which in ("shared", "both"):
        chosen.append(Layout(f"shared: both ends on CPUs {cpu_list(cpus)}", None, None))
    if which in ("partitioned", "both"):
        if len(cpus) < 2:
            raise SystemExit("the partitioned layout needs at least 2 CPUs")
        local, remote = cpus[: len(cpus) // 2], cpus[len(cpus) // 2 :]
        chosen.append(Layout(
            f"partitioned: local CPU {cpu_list(local)}, lab host CPU {cpu_list(remote)}",
            frozenset(local), cpu_list(remote)))
    return chosen


def machine_busy_cpu() -> float:
    """CPU seconds this machine has been busy (all CPUs; idle and iowait excluded)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user..steal minus idle, iowait
    return busy / os.sysconf("SC_CLK_TCK")


def container_cpu_file(name: str) -> Path | None:
    """The cgroup file counting container ``name``'s CPU time (v1 or v2), if readable."""
    cgroup = lab.engine("inspect", "--format", "{{.State.CgroupPath}}", name,
                        check=False).stdout.decode().strip().lstrip("/")
    root = Path("/sys/fs/cgroup")
    for path in (root / "cpuacct" / cgroup / "cpuacct.usage", root / cgroup / "cpu.stat"):
        if cgroup and path.is_file():
            return path
    return None


def own_cpu(cpu_file: Path) -> float:
    """CPU seconds of this process's finished children (invoke, the local compilers) plus
    the lab container's (all of it runs in the container's cgroup: sshd, make, gcc)."""
    text = cpu_file.read_text()
    if cpu_file.name == "cpuacct.usage":
        inside = int(text) / 1e9
    else:
        usage = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
        inside = int(usage["usage_usec"]) / 1e6
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return children.ru_utime + children.ru_stime + inside


def run_build(argv: list[str], before: Callable[[], None] | None = None,
              cpu_file: Path | None = None,
              others: list[float] | None = None) -> tuple[float, str]:
    """Wall seconds and stdout of one invoke run (``before`` runs outside the clock).

    With ``cpu_file`` (the lab container's) and ``others``: appends the CPU seconds the
    machine spent meanwhile on anything but this run and the lab host."""
    if before:
        before()
    mine = own_cpu(cpu_file) if cpu_file else 0.0
    busy = machine_busy_cpu()
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    busy = machine_busy_cpu() - busy
    if cpu_file and others is not None:
        others.append(max(0.0, busy - (own_cpu(cpu_file) - mine)))
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv[1:3])} failed ({result.returncode}): "
                         f"{(result.stdout + result.stderr)[-800:]}")
    return elapsed, result.stdout


def end_of(name: str) -> str:
    return "local" if name == "local" else "remote"


def read_logs(out: str, host: HostSpec) -> dict[str, str]:
    """Each end's build log (by "local"/"remote"); the local log's leftover dir goes."""
    logs = {}
    for m in _LOG.finditer(out):
        path = m["path"]
        if m["end"] == "local":
            logs["local"] = Path(path).read_text(errors="replace")
            # build_rsync keeps the log (alone in its mktemp dir) for the user: ours go.
            if Path(path).parent.name.startswith("pullback-rsync."):
                shutil.rmtree(Path(path).parent, ignore_errors=True)
        else:
            logs["remote"] = lab.engine("exec", host.name, "cat", path).stdout.decode(
                errors="replace")
    return logs


def measure(layout: Layout, repeat: int) -> Measured:
    lab.down(PREFIX)  # a container from another layout has the wrong cpuset
    lab_hosts = lab.up(count=1, prefix=PREFIX, log=lambda m: None, cpuset=layout.cpuset)
    port = lab.start_mirror(PREFIX)
    path = lab.write_inventory(lab_hosts, port, PREFIX)
    host = next(iter(load(path).hosts.values()))
    base = [INVOKE, "build-rsync", "--inventory", str(path)]
    cpu_file = container_cpu_file(host.name)

    def wipe() -> None:
        shutil.rmtree(host.rsync.local_prefix, ignore_errors=True)
        exec_root(host.name, "rm -rf /usr/local/bin/rsync /usr/local/share/pullback")

    measured = Measured()
    everything = os.sched_getaffinity(0)
    if layout.local_cpus:
        os.sched_setaffinity(0, layout.local_cpus)  # the main thread: subprocesses inherit it
    try:
        measured.nproc["local"] = int(subprocess.run(
            ["nproc"], capture_output=True, text=True, check=True).stdout)
        measured.nproc["remote"] = int(lab.engine("exec", host.name, "nproc").stdout)
        # Fills the download cache and warms the compilers and the page cache.
        _, out = run_build(base + ["--local-only"], wipe)
        read_logs(out, host)
        for _ in range(repeat):
            for label, extra in RUNS.items():
                elapsed, out = run_build(base + extra, wipe, cpu_file, measured.other_cpu)
                measured.wall[label].append(elapsed)
                for m in _PHASE.finditer(out):
                    key = (label, end_of(m["end"]), m["phase"])
                    measured.phases[key].append(float(m["s"]))
                for end, text in read_logs(out, host).items():
                    measured.jobs[end].update(int(j) for j in _MAKE_J.findall(text))
        for _ in range(repeat):
            measured.noop.append(run_build(base, None, cpu_file, measured.other_cpu)[0])
    finally:
        os.sched_setaffinity(0, everything)
    return measured


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def jobs_cell(m: Measured) -> str:
    def one(end: str) -> str:
        jobs = "/".join(f"-j{j}" for j in sorted(m.jobs[end])) or "?"
        return f"{m.nproc[end]}, make {jobs}"
    return f"{one('local')} / {one('remote')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=("both", "shared", "partitioned"), default="both")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row (median shown)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    chosen = layouts(args.layout)
    results: list[Measured] = []
    try:
        results = [measure(layout, args.repeat) for layout in chosen]
    finally:
        lab.down(PREFIX)

    unit = "wall s" if args.repeat == 1 else f"wall s, median of {args.repeat}"
    rows: list[list[object]] = [
        [label] + [f"{med(m.wall[label]):.1f}" for m in results] for label in RUNS
    ]
    rows.append(["no-op re-run (both ends)"] + [f"{med(m.noop):.2f}" for m in results])
    ratios = []
    for m in results:
        one = max(med(m.wall["local end only"]), med(m.wall["remote end only"]))
        ratios.append(f"{med(m.wall['both ends at once']) / one:.2f}")
    rows.append(["ratio both / slower single end"] + ratios)
    rows.append(["nproc and make -j (local / lab host)"] + [jobs_cell(m) for m in results])
    rows.append(["other work's CPU s during a run (max; noise)"]
                + [f"{max(m.other_cpu):.1f}" if m.other_cpu else "?" for m in results])
    print(table([f"build-rsync 3.2.7 ({unit})"] + [layout.label for layout in chosen], rows))

    phase_rows = []
    for label in RUNS:
        for end in ("local", "remote"):
            if (label, end, "make") not in results[0].phases:
                continue
            cells = [
                f"{med(m.phases[(label, end, 'configure')]):.1f} + "
                f"{med(m.phases[(label, end, 'make')]):.1f}"
                for m in results
            ]
            phase_rows.append([f"{label}: {end} end"] + cells)
    print()
    print(table(["configure + make s, as build-rsync reports them"]
                + [layout.label for layout in chosen], phase_rows))
    noisiest = max((c for m in results for c in m.other_cpu), default=0.0)
    if noisiest > NOISE_CPU_S:
        print(f"\nwarning: other work used up to {noisiest:.1f} CPU s during a run: the "
              "machine was not quiet; re-run for numbers to publish")


if __name__ == "__main__":
    main()
