"""rsync's own progress output, pure: what a live view of a pull shows (files, bytes, rate).

Two formats reach it, told apart by the option the pull was given (``build_argv``):

- ``--info=progress2`` (both ends rsync >= 3.1): one line for the whole transfer, its bytes
  the running total (the size of the files done so far, as rsync counts them)::

      \\r      3,000,000  99%    1.01MB/s    0:00:02 (xfr#1, to-chk=4/6)

- ``--progress`` (per file, every release; 2.6.9 and 3.0 print ``xfer#``/``to-check=`` and
  no thousands separators): a line per update of the current file, the last one of each
  file ending with its transfer number::

      big.bin
             1048576  34%  966.86kB/s    0:00:02\\r
             3000000 100%  986.95kB/s    0:00:02 (xfer#1, to-check=4/6)

Lines end in ``\\r`` (updates) or ``\\n``; file names (``-v``), ``--stats`` and errors pass
by and are ignored. Numbers may carry ``-h`` units (``3.00M``: units of 1000); rates are
rsync's ``kB/s``/``MB/s``/``GB/s`` (units of 1024).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from roles.core.pull import rsync_number

_LINE = re.compile(
    r"^\s*(?P<bytes>[\d,.]+[KMGTP]?)\s+(?P<percent>\d+)%\s+"
    r"(?P<rate>[\d,.]+)(?P<unit>[kMGT]?B)/s\s+(?P<time>\d+:\d\d(?::\d\d)?)"
    r"(?:\s+\((?:xfr|xfer)#(?P<xfr>\d+),\s*(?:to-chk|to-check|ir-chk)=(?P<left>\d+)/"
    r"(?P<total>\d+)\))?\s*$")
_RATE_UNITS = {"B": 1, "kB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_CARRY = 4096  # a progress line is ~80 characters; anything longer is a file name


@dataclass(frozen=True)
class ProgressLine:
    """One progress line: ``bytes`` of the current file (``--progress``) or of the whole
    pull (``--info=progress2``); ``transfer`` (xfr#N) only on the line that ends a file."""

    bytes: int
    percent: int
    rate: float  # bytes per second, as rsync shows it
    transfer: int | None = None
    to_check: int | None = None
    total: int | None = None


def parse_progress_line(line: str) -> ProgressLine | None:
    """One line of rsync's output (without its ``\\r`` or ``\\n``), or None when it is not
    a progress line (a file name, ``--stats``, an error)."""
    match = _LINE.match(line)
    if match is None:
        return None
    rate = float(match["rate"].replace(",", "")) * _RATE_UNITS[match["unit"]]
    return ProgressLine(
        bytes=rsync_number(match["bytes"]), percent=int(match["percent"]), rate=rate,
        transfer=int(match["xfr"]) if match["xfr"] else None,
        to_check=int(match["left"]) if match["left"] else None,
        total=int(match["total"]) if match["total"] else None)


@dataclass
class PullProgress:
    """Where a pull is, from its output so far: ``files`` transferred, ``bytes`` (the files'
    sizes done so far plus the current file's part), rsync's last ``rate``. ``whole``: the
    output is ``--info=progress2``'s (bytes are already the total)."""

    whole: bool
    files: int = 0
    bytes: int = 0
    rate: float | None = None
    percent: int | None = None  # progress2 only: of the whole transfer
    _done: int = 0  # --progress: the finished files' bytes
    _carry: str = ""

    def feed(self, chunk: bytes) -> None:
        """The next piece of output, cut anywhere (a line may span two chunks)."""
        text = self._carry + chunk.decode(errors="replace")
        lines = re.split(r"[\r\n]", text)
        self._carry = lines.pop()[-_CARRY:]
        for line in lines:
            self._take(line)

    def close(self) -> None:
        """The output ended: read what is left after its last line end."""
        self._take(self._carry)
        self._carry = ""

    def _take(self, line: str) -> None:
        progress = parse_progress_line(line)
        if progress is None:
            return
        self.rate = progress.rate
        ends = progress.transfer is not None and progress.transfer > self.files
        if progress.transfer is not None:
            self.files = max(self.files, progress.transfer)
        if self.whole:
            self.bytes = max(self.bytes, progress.bytes)
            self.percent = progress.percent
        elif ends:  # the file's last line: its whole size
            self._done += progress.bytes
            self.bytes = self._done
        elif progress.transfer is None:
            self.bytes = self._done + progress.bytes


def read_progress(output: str | bytes, *, whole: bool) -> PullProgress:
    """The progress of a pull whose whole output so far is ``output``."""
    progress = PullProgress(whole=whole)
    progress.feed(output.encode() if isinstance(output, str) else output)
    progress.close()
    return progress
