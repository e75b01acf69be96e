"""rsync's progress output (roles.core.progress) and ``invoke backup``'s view of a fleet run
without a terminal (roles.cli.progress): tables of real rsync output, 3.x and 2.6.9."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from roles.cli.progress import (
    DONE,
    FAILED,
    RUNNING,
    WAITING,
    FleetView,
    LiveView,
    PlainView,
    end_line,
    format_seconds,
    view_for,
)
from roles.core.progress import ProgressLine, parse_progress_line, read_progress
from roles.core.pull import parse_stats
from roles.features.backup import BackupResult

DATA = Path(__file__).parent / "data" / "progress"  # README.md there: how each was captured
KB, MB = 1024, 1024 * 1024


@pytest.mark.parametrize(("line", "want"), [
    # rsync 3.x --progress: an update, then the file's last line.
    ("      1,081,344  36% 1005.89kB/s    0:00:01  ",
     ProgressLine(1081344, 36, 1005.89 * KB)),
    ("      3,000,000 100%    1.01MB/s    0:00:02 (xfr#1, to-chk=4/6)",
     ProgressLine(3000000, 100, 1.01 * MB, transfer=1, to_check=4, total=6)),
    # incremental recursion still building the list
    ("             12 100%    0.00kB/s    0:00:00 (xfr#7, ir-chk=1021/1114)",
     ProgressLine(12, 100, 0.0, transfer=7, to_check=1021, total=1114)),
    # -h: units of 1000
    ("          2.13M  70% 1000.49kB/s    0:00:00  ", ProgressLine(2130000, 70, 1000.49 * KB)),
    ("          3.00M  99%    1.01MB/s    0:00:02 (xfr#2, to-chk=2/6)",
     ProgressLine(3000000, 99, 1.01 * MB, transfer=2, to_check=2, total=6)),
    # rsync 2.6.9 (and 3.0): no separators, xfer# and to-check=
    ("     1048576  34%  966.86kB/s    0:00:02", ProgressLine(1048576, 34, 966.86 * KB)),
    ("     3000000 100%  986.95kB/s    0:00:02 (xfer#1, to-check=4/6)",
     ProgressLine(3000000, 100, 986.95 * KB, transfer=1, to_check=4, total=6)),
    # a long transfer: hours in the time, GB/s
    (" 98,765,432,100  51%    1.25GB/s    1:02:03  ",
     ProgressLine(98765432100, 51, 1.25 * 1024 * MB)),
    # everything else rsync prints
    ("big.bin", None),
    ("sub/", None),
    ("link -> small", None),
    ("Number of files: 6 (reg: 3, dir: 2, link: 1)", None),
    ("sent 3,002,272 bytes  received 112 bytes  857,824.00 bytes/sec", None),
    ("total size is 3,001,242  speedup is 1.00", None),
    ("rsync error: some files/attrs were not transferred (code 23) at main.c(1338)", None),
    ("", None),
    # a file named like a progress line still has no rate and time
    ("100 50%", None),
])
def test_parse_progress_line(line, want):
    got = parse_progress_line(line)
    if want is None:
        assert got is None
    else:
        assert got is not None
        assert (got.bytes, got.percent, got.transfer, got.to_check, got.total) == (
            want.bytes, want.percent, want.transfer, want.to_check, want.total)
        assert got.rate == pytest.approx(want.rate)


CAPTURED = [
    ("rsync-3.5.0-progress.txt", False),
    ("rsync-3.5.0-progress2.txt", True),
    ("rsync-3.5.0-progress2-h.txt", True),
    ("rsync-2.6.9-progress.txt", False),
]


@pytest.mark.parametrize(("name", "whole"), CAPTURED)
def test_a_whole_run_adds_up_to_its_own_stats(name, whole):
    """Files and bytes at the end are what --stats says rsync transferred (-h: to 3 digits)."""
    output = (DATA / name).read_bytes()
    assert b"\r" in output  # the updates in place are there, as rsync wrote them
    stats = parse_stats(output.decode())
    progress = read_progress(output, whole=whole)
    assert progress.files == stats["files_transferred"] == 3
    assert progress.bytes == pytest.approx(stats["transferred_size"], rel=1e-3)
    assert progress.rate is not None


@pytest.mark.parametrize(("name", "whole"), CAPTURED)
@pytest.mark.parametrize("size", [1, 7, 64, 4096])
def test_chunks_cut_anywhere_read_the_same(name, whole, size):
    output = (DATA / name).read_bytes()
    whole_read = read_progress(output, whole=whole)
    progress = read_progress(b"", whole=whole)
    for i in range(0, len(output), size):
        progress.feed(output[i:i + size])
    progress.close()
    assert (progress.files, progress.bytes, progress.rate) == (
        whole_read.files, whole_read.bytes, whole_read.rate)


@pytest.mark.parametrize(("name", "whole", "cut", "files", "size"), [
    # during big.bin: the part of the file done so far
    ("rsync-3.5.0-progress.txt", False, b"1.01MB/s", 0, 2129920),
    ("rsync-2.6.9-progress.txt", False, b"  986.95kB/s", 0, 2097152),
    ("rsync-3.5.0-progress2.txt", True, b"1.01MB/s", 0, 2129920),
    # during small, after big.bin: per file, the finished files' sizes plus this one's
    ("rsync-3.5.0-progress.txt", False, b"(xfr#2", 1, 3001234),
    ("rsync-2.6.9-progress.txt", False, b"(xfer#2", 1, 3001234),
    ("rsync-3.5.0-progress2.txt", True, b"\r      3,001,234", 1, 3000000),
])
def test_the_progress_halfway(name, whole, cut, files, size):
    output = (DATA / name).read_bytes()
    progress = read_progress(output[:output.index(cut)], whole=whole)  # a line cut short too
    assert (progress.files, progress.bytes) == (files, size)


def test_a_repeated_last_line_is_counted_once():
    line = b"\r      3,000,000 100%    1.01MB/s    0:00:02 (xfr#1, to-chk=0/1)"
    progress = read_progress(line * 3 + b"\n", whole=False)
    assert (progress.files, progress.bytes) == (1, 3000000)


# --- the view without a terminal -----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def result(host: str, ok: bool = True, seconds: float = 4.2, **stats) -> BackupResult:
    return BackupResult(host, ok=ok, exit_code=0 if ok else 23, seconds=seconds, stats=stats)


def test_plain_view_prints_one_start_and_one_end_line_per_host_and_no_escape_codes():
    out, err = io.StringIO(), io.StringIO()
    view = view_for(["web1", "db1"], out, err)  # a StringIO is no terminal
    assert isinstance(view, PlainView) and not view.live
    view.started("web1")
    view.started("db1")
    view.finished(result("db1", ok=False, seconds=1.5))
    view.finished(result("web1", files_transferred=1234, transferred_size=5_600_000))
    view.finished(result("web1"))  # told twice (a run and its error handler): one line
    view.close()
    assert out.getvalue() == ""  # stdout: only the summary table, which pull_all prints
    assert err.getvalue().splitlines() == [
        "web1: started",
        "db1: started",
        "db1: failed after 1.5 s",
        "web1: done in 4.2 s, 1,234 files, 5.6 MB",
    ]
    assert "\x1b" not in err.getvalue()


def test_end_lines():
    assert end_line(result("a", seconds=75)) == "a: done in 1:15"
    dry = result("a", files_transferred=2, transferred_size=10)
    dry.dry_run = True
    assert end_line(dry) == "a: dry run done in 4.2 s, 2 files, 10 B"
    assert end_line(result("a", ok=False, seconds=3725)) == "a: failed after 1:02:05"


@pytest.mark.parametrize(("seconds", "shown"), [
    (0, "0.0 s"), (59.94, "59.9 s"), (60, "1:00"), (3599, "59:59"), (3600, "1:00:00")])
def test_format_seconds(seconds, shown):
    assert format_seconds(seconds) == shown


def test_the_lines_follow_each_host_from_waiting_to_done():
    clock = Clock()
    view = FleetView(["web1", "db1", "mail"], clock=clock)
    assert [row[1] for row in view.rows()] == [WAITING] * 3
    view.started("web1")
    view.started("db1")
    sink = view.output("web1", whole=False)
    sink.write((DATA / "rsync-2.6.9-progress.txt").read_bytes()[:300])
    clock.now += 2.5
    web1, db1, mail = view.rows()
    assert web1[:2] == ("web1", RUNNING) and web1[5] == "2.5 s"
    assert web1[3] != "-" and web1[4].endswith("/s")
    assert db1 == ("db1", RUNNING, "-", "-", "-", "2.5 s")  # no output read yet
    assert mail == ("mail", WAITING, "-", "-", "-", "-")
    view.finished(result("web1", seconds=3.0, files_transferred=3, transferred_size=3_001_237))
    view.finished(result("db1", ok=False, seconds=2.0))
    clock.now += 60
    web1, db1, _ = view.rows()
    assert web1 == ("web1", DONE, "3", "3.0 MB", "1.0 MB/s", "3.0 s")
    assert db1 == ("db1", FAILED, "-", "-", "-", "2.0 s")
    view.output("mail", whole=True)  # its pull started, but nothing moved
    view.finished(result("mail", ok=False, seconds=1.0))
    assert view.rows()[2] == ("mail", FAILED, "0", "0 B", "-", "1.0 s")


def test_live_view_draws_every_host_and_stops():
    """Off a terminal rich draws the last state once, at the stop (the pty test sees it live)."""
    out = io.StringIO()
    view = LiveView(["web1", "db1"], out, clock=Clock())
    view.started("web1")
    view.finished(result("web1", files_transferred=3, transferred_size=3_001_237))
    view.close()
    text = out.getvalue()
    assert "web1" in text and "done" in text and "db1" in text and "waiting" in text
