"""What the scheduled backup path pays at start-up for each optional feature.

Each run starts a fresh interpreter (bytecode caches warm) that imports what a
``pullback-backup`` run imports, then what a feature adds: urllib.request for a
``monitor.ping_url`` (roles.local.ping imports it only then), roles.remote.hooks (Fabric,
paramiko) for ``backup.pre``/``post``. The times are taken inside the process, so the
interpreter's own start does not blur them. Prints the median of ``--runs`` runs.

    .venv/bin/python bench/bench_imports.py [--runs 21]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = {
    "monitor.ping_url (urllib.request)": "urllib.request",
    "backup.pre/post (roles.remote.hooks)": "roles.remote.hooks",
}
PROBE = """
import importlib, json, sys, time
t0 = time.perf_counter()
import roles.cli.unattended
t1 = time.perf_counter()
importlib.import_module(sys.argv[1])
t2 = time.perf_counter()
print(json.dumps([t1 - t0, t2 - t1]))
"""


def probe(module: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, module], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    base, extra = json.loads(out)
    return base, extra


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    for module in EXTRAS.values():
        probe(module)  # write the bytecode caches
    base: list[float] = []
    extra: dict[str, list[float]] = {name: [] for name in EXTRAS}
    for _ in range(args.runs):  # round robin: a busy machine slows every case alike
        for name, module in EXTRAS.items():
            b, e = probe(module)
            base.append(b)
            extra[name].append(e)
    print("| imports | median ms |\n| --- | --- |")
    print(f"| pullback-backup's own (roles.cli.unattended) | "
          f"{statistics.median(base) * 1000:.1f} |")
    for name, times in extra.items():
        print(f"| + {name} | {statistics.median(times) * 1000:.1f} |")


if __name__ == "__main__":
    main()
