"""The Prometheus textfile-collector file: one sample per metric and host.

node_exporter's ``--collector.textfile.directory`` reads every ``*.prom`` file in one
folder; ``monitor.metrics_file`` names ours. Several hosts (and several runs: a
``--host`` run updates only its hosts) share the file, so an update reads it, replaces
the samples of the hosts that just ran, keeps the others', and writes it whole through a
temporary file and a rename (``write_atomic``: the collector never reads half a file),
under an flock on ``FILE.lock`` so two runs never lose each other's update.

Metrics (label ``host``)::

    pullback_last_run_timestamp_seconds      start of the newest real run (Unix time)
    pullback_last_success_timestamp_seconds  start of the newest good run (exit 0 or 24)
    pullback_last_duration_seconds           how long the newest run took
    pullback_last_exit_code                  rsync's exit code; -1 when rsync never ran
    pullback_last_success                    1 when the newest run was good, else 0
    pullback_last_files                      rsync's "Number of files" (newest good run)
    pullback_last_transferred_bytes          "Total transferred file size" (newest good run)
    pullback_last_received_bytes             bytes over the wire (newest good run)

Alert on ``time() - pullback_last_success_timestamp_seconds > 36 * 3600`` and on
``pullback_last_success == 0``. Standard library only: it runs on the lean backup path.
"""

from __future__ import annotations

import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path

from roles.local.files import write_atomic

PREFIX = "pullback_"
METRICS: dict[str, tuple[str, str]] = {  # name -> (type, help)
    "last_run_timestamp_seconds": ("gauge", "Start of the newest real backup run (Unix time)."),
    "last_success_timestamp_seconds": ("gauge", "Start of the newest good backup run "
                                                "(exit 0 or 24, Unix time)."),
    "last_duration_seconds": ("gauge", "Duration of the newest backup run."),
    "last_exit_code": ("gauge", "rsync exit code of the newest run (-1: rsync never ran)."),
    "last_success": ("gauge", "1 if the newest backup run was good, else 0."),
    "last_files": ("gauge", "rsync's Number of files of the newest good run."),
    "last_transferred_bytes": ("gauge", "Total transferred file size of the newest good run."),
    "last_received_bytes": ("gauge", "Bytes received over the wire by the newest good run."),
}
# Kept from the previous file when the newest run failed: they describe the last GOOD run.
FROM_GOOD_RUN = ("last_success_timestamp_seconds", "last_files", "last_transferred_bytes",
                 "last_received_bytes")

_SAMPLE = re.compile(r'^pullback_([a-z_]+)\{host="((?:[^"\\]|\\.)*)"\} (\S+)$')


@dataclass(frozen=True)
class RunMetrics:
    """What one run of one host reports."""
    host: str
    started: float  # Unix time
    seconds: float
    ok: bool
    exit_code: int | None
    files: int | None = None
    transferred: int | None = None
    received: int | None = None


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], value)


def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    """Pure: ``{host: {metric: value}}`` from a file ``render_metrics`` wrote; lines it did
    not write are ignored (and dropped at the next write)."""
    found: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match[1] in METRICS:
            try:
                found.setdefault(_unescape(match[2]), {})[match[1]] = float(match[3])
            except ValueError:
                continue
    return found


def merge_run(previous: dict[str, float], run: RunMetrics) -> dict[str, float]:
    """Pure: a host's samples after ``run``; a failed run keeps the last good run's."""
    samples = {
        "last_run_timestamp_seconds": run.started,
        "last_duration_seconds": run.seconds,
        "last_exit_code": -1 if run.exit_code is None else run.exit_code,
        "last_success": 1 if run.ok else 0,
    }
    if run.ok:
        samples["last_success_timestamp_seconds"] = run.started
        for name, value in (("last_files", run.files), ("last_transferred_bytes",
                                                        run.transferred),
                            ("last_received_bytes", run.received)):
            if value is not None:
                samples[name] = value
    else:
        samples.update({k: previous[k] for k in FROM_GOOD_RUN if k in previous})
    return samples


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render_metrics(hosts: dict[str, dict[str, float]]) -> str:
    """Pure: the exposition text, metric by metric, hosts sorted."""
    lines: list[str] = []
    for name, (kind, text) in METRICS.items():
        rows = [(host, samples[name]) for host, samples in sorted(hosts.items())
                if name in samples]
        if not rows:
            continue
        lines += [f"# HELP {PREFIX}{name} {text}", f"# TYPE {PREFIX}{name} {kind}"]
        lines += [f'{PREFIX}{name}{{host="{_escape(host)}"}} {_number(value)}'
                  for host, value in rows]
    return "\n".join(lines) + "\n" if lines else ""


def update_metrics(path: Path, runs: list[RunMetrics]) -> None:
    """Replace the samples of ``runs``' hosts in ``path`` (others kept); atomic, locked.
    Raises OSError when the folder is missing or not writable."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent} does not exist")
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # runs are short here: wait for the other writer
        try:
            hosts = parse_metrics(path.read_text(errors="replace"))
        except FileNotFoundError:
            hosts = {}
        for run in runs:
            hosts[run.host] = merge_run(hosts.get(run.host, {}), run)
        write_atomic(path, render_metrics(hosts).encode(), 0o644)
    finally:
        os.close(fd)
