"""Shared set-up for the benchmarks: lab hosts of their own, set up in daemon mode."""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab import hosts as lab  # noqa: E402
from roles.core import fleet  # noqa: E402
from roles.core.outcome import Outcome  # noqa: E402
from roles.core.spec import HostSpec  # noqa: E402
from roles.features import setup_remote as setup  # noqa: E402
from roles.inventory.schema import load  # noqa: E402
from roles.local import keys  # noqa: E402

INVOKE = str(Path(sys.executable).parent / "invoke")


def provision(prefix: str, count: int, **backup: object) -> tuple[Path, list[HostSpec]]:
    """Start ``count`` lab hosts, write an inventory, keygen, setup-remote (daemon mode)."""
    lab.down(prefix)
    lab_hosts = lab.up(count=count, prefix=prefix, log=lambda m: None)
    path = lab.write_inventory(lab_hosts, None, prefix)
    if backup:
        text = path.read_text()
        for key in backup:  # the lab's own value of a key goes
            text = re.sub(rf"(?m)^    {key}: .*\n", "", text)
        extra = "".join(f"    {k}: {v}\n" for k, v in backup.items())
        path.write_text(text.replace("  backup:\n", "  backup:\n" + extra, 1))
    hosts = list(load(path).hosts.values())
    keys.ensure_backup_key(Path(hosts[0].backup_key))
    outcomes = fleet.for_each(hosts, setup.setup_host,
                              lambda h, e: Outcome(h.name, {}, error=str(e)), parallel=32)
    failed = [o for o in outcomes if o.error]
    if failed:
        raise SystemExit(f"setup-remote failed: {failed[0].host}: {failed[0].error}")
    return path, hosts


def exec_root(name: str, script: str) -> None:
    lab.engine("exec", name, "sh", "-c", script, timeout=600)


def timed(argv: list[str], before: Callable[[], None] | None = None) -> float:
    if before:
        before()
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode not in (0, 24):
        raise SystemExit(f"{argv[0]} failed ({result.returncode}): {result.stderr[-500:]!r}")
    return elapsed


def median(values: list[float]) -> float:
    return statistics.median(values)


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
