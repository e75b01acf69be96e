"""``invoke backup``'s view of a fleet run: a live line per host on a terminal, plain lines
otherwise.

On a terminal (``LiveView``, drawn by rich and updated in place a few times a second) each
host has one line: its state (waiting, running, done, failed), the files and bytes
transferred so far, the rate and the time it has taken. The numbers come from rsync's own
progress output (``roles.core.progress``): the pulls keep their progress option, and their
output goes to the log and to this view, never to the screen as such.

Without a terminal (CI, cron, a pipe: ``PlainView``) nothing is redrawn and the pulls
run as before, without progress options: one line when a host starts and one when it
ends, on stderr with the warnings (stdout keeps only the summary table, which scripts
read). The summary table and the failure lines that follow are ``pull_all``'s, in both.

rich is loaded here only, above the features: ``pullback-backup`` (the scheduled path)
never imports it (pyproject.toml's lean-path contract).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from roles.core.progress import PullProgress
from roles.local.store import human_bytes

if TYPE_CHECKING:
    from roles.features.backup import BackupResult

WAITING, RUNNING, DONE, FAILED = "waiting", "running", "done", "failed"


@dataclass
class HostLine:
    """One host's line: what the view knows of its run."""

    name: str
    state: str = WAITING
    started: float | None = None
    seconds: float | None = None  # the run's own figure, once it ended
    progress: PullProgress | None = None
    files: int | None = None
    bytes: int | None = None
    rate: float | None = None

    def elapsed(self, now: float) -> float | None:
        if self.seconds is not None:
            return self.seconds
        return None if self.started is None else now - self.started

    def cells(self, now: float) -> tuple[str, str, str, str, str, str]:
        """host, state, files, bytes, rate, elapsed: as shown."""
        files, size, rate = self.files, self.bytes, self.rate
        if self.progress is not None and self.state == RUNNING:
            files, size, rate = self.progress.files, self.progress.bytes, self.progress.rate
        elapsed = self.elapsed(now)
        return (self.name, self.state, "-" if files is None else f"{files:,}",
                human_bytes(size), "-" if rate is None else f"{human_bytes(round(rate))}/s",
                "-" if elapsed is None else format_seconds(elapsed))


def format_seconds(seconds: float) -> str:
    """``4.2 s`` below a minute, then ``m:ss`` and ``h:mm:ss``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class _Sink:
    """Where one pull's output goes besides its log: parsed, never shown as such."""

    def __init__(self, lock: threading.Lock, progress: PullProgress) -> None:
        self._lock = lock
        self._progress = progress

    def write(self, chunk: bytes) -> int:
        with self._lock:
            self._progress.feed(chunk)
        return len(chunk)

    def flush(self) -> None:
        pass


class FleetView:
    """The hosts' lines and what changes them (called from the pulls' threads)."""

    live = False

    def __init__(self, names: Iterable[str], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lines = {name: HostLine(name) for name in names}
        self._clock = clock
        self._lock = threading.Lock()

    def started(self, host: str) -> None:
        with self._lock:
            line = self.lines.setdefault(host, HostLine(host))
            line.state, line.started = RUNNING, self._clock()

    def output(self, host: str, whole: bool) -> _Sink:
        with self._lock:
            line = self.lines.setdefault(host, HostLine(host))
            line.progress = PullProgress(whole=whole)
            return _Sink(self._lock, line.progress)

    def finished(self, result: BackupResult) -> bool:
        """Record ``result``; False when the host had already ended (told twice)."""
        with self._lock:
            line = self.lines.setdefault(result.host, HostLine(result.host))
            if line.state in (DONE, FAILED):
                return False
            if line.progress is not None:
                line.progress.close()
            line.state = DONE if result.ok else FAILED
            line.seconds = result.seconds
            stats = result.stats or {}
            line.files = stats.get("files_transferred")
            line.bytes = stats.get("transferred_size")
            if line.bytes is None and line.progress is not None:
                line.files, line.bytes = line.progress.files, line.progress.bytes
            if line.bytes and result.seconds > 0:  # nothing moved: no rate
                line.rate = line.bytes / result.seconds
            return True

    def rows(self) -> list[tuple[str, str, str, str, str, str]]:
        with self._lock:
            now = self._clock()
            return [line.cells(now) for line in self.lines.values()]

    def close(self) -> None:
        pass


class PlainView(FleetView):
    """No terminal: a line when a host starts and one when it ends, nothing redrawn."""

    def __init__(self, names: Iterable[str], out: TextIO, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(names, clock=clock)
        self._out = out
        self._print = threading.Lock()

    def _say(self, text: str) -> None:
        with self._print:
            print(text, file=self._out, flush=True)

    def started(self, host: str) -> None:
        super().started(host)
        self._say(f"{host}: started")

    def finished(self, result: BackupResult) -> bool:
        if not super().finished(result):
            return False
        self._say(end_line(result))
        return True


def end_line(result: BackupResult) -> str:
    """``web1: done in 4.2 s, 12 files, 3.0 MB`` or ``web1: failed after 4.2 s``."""
    if not result.ok:
        return f"{result.host}: failed after {format_seconds(result.seconds)}"
    stats = result.stats or {}
    files, size = stats.get("files_transferred"), stats.get("transferred_size")
    what = "dry run done" if result.dry_run else "done"
    line = f"{result.host}: {what} in {format_seconds(result.seconds)}"
    if files is not None:
        line += f", {files:,} files"
    if size is not None:
        line += f", {human_bytes(size)}"
    return line


class LiveView(FleetView):
    """A terminal: one line per host, redrawn in place by rich while the pulls run."""

    live = True

    def __init__(self, names: Iterable[str], out: TextIO, *,
                 clock: Callable[[], float] = time.monotonic,
                 refresh_per_second: float = 4) -> None:
        super().__init__(names, clock=clock)
        self._live = Live(console=Console(file=out), get_renderable=self.table,
                          refresh_per_second=refresh_per_second, transient=False,
                          redirect_stdout=False, redirect_stderr=False)
        self._live.start()

    def table(self) -> Table:
        table = Table(box=box.SIMPLE, pad_edge=False)
        for title in ("host", "state", "files", "bytes", "rate", "elapsed"):
            table.add_column(title, justify="left" if title in ("host", "state") else "right")
        styles = {WAITING: "dim", RUNNING: "bold", DONE: "green", FAILED: "bold red"}
        for row in self.rows():
            table.add_row(*row, style=styles.get(row[1]))
        return table

    def close(self) -> None:
        self._live.stop()  # the last drawing stays, the summary table follows below it


def view_for(names: list[str], out: TextIO, err: TextIO) -> FleetView | None:
    """The view of ``invoke backup``: live on ``out`` when it is a terminal and there are
    several hosts; one host on a terminal gets none (rsync's own output is shown, and ssh
    may ask for a passphrase); otherwise the plain lines, on ``err`` beside the warnings,
    so ``out`` keeps only the summary table, as before."""
    if out.isatty():
        return LiveView(names, out) if len(names) > 1 else None
    return PlainView(names, err)
