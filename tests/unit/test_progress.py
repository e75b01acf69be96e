"""rsync's progress output (roles.core.progress): tables of real rsync output, 3.x and 2.6.9."""

from __future__ import annotations

from pathlib import Path

import pytest

from roles.core.progress import ProgressLine, parse_progress_line, read_progress
from roles.core.pull import parse_stats

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
