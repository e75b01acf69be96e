"""roles.core.mounts: the mount table parsed, and which mounts a -x pull skips (a table)."""

from __future__ import annotations

import pytest

from roles.core import mounts
from roles.core import rsync as rsync_model

# A Debian server with /home, /var, /boot and /boot/efi of their own, the kernel's views,
# a tmpfs at /run (excluded by default) and one at /srv/cache (not), a container-style
# file mount, stacked mounts, a snap image and an escaped space.
MOUNTINFO = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
24 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:6 - sysfs sysfs rw
25 24 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec - cgroup2 cgroup2 rw
26 22 0:5 / /dev rw,nosuid,relatime shared:2 - devtmpfs udev rw
27 26 0:24 / /dev/pts rw,nosuid,noexec - devpts devpts rw
28 26 0:25 / /dev/mqueue rw,nosuid - mqueue mqueue rw
29 22 0:26 / /run rw,nosuid,nodev - tmpfs tmpfs rw
30 29 0:27 / /run/user/1000 rw,nosuid,nodev - tmpfs tmpfs rw
31 22 8:2 / /home rw,relatime shared:20 - ext4 /dev/sda2 rw
32 22 8:3 / /var rw,relatime shared:21 - xfs /dev/sda3 rw
33 22 8:4 / /boot rw,relatime shared:22 - ext4 /dev/sda4 rw
34 33 8:5 / /boot/efi rw,relatime shared:23 - vfat /dev/sda5 rw
35 22 0:28 / /tmp rw,nosuid,nodev - tmpfs tmpfs rw
36 22 0:29 / /srv/cache rw - tmpfs tmpfs rw
37 22 8:1 /etc/hostname /etc/hostname rw - ext4 /dev/sda1 rw
38 22 7:0 / /snap/core/123 ro - squashfs /dev/loop0 ro
39 22 8:6 / /srv/my\040data rw - ext4 /dev/sda6 rw
40 36 0:30 / /srv/cache rw - ext4 /dev/sdb1 rw
41 32 0:31 / /var/lib/docker/x rw - overlay overlay rw
42 22 0:32 / /proc/sys/fs/binfmt_misc rw - binfmt_misc binfmt_misc rw
"""

ALL = mounts.parse_mountinfo(MOUNTINFO)
DEFAULT = tuple(rsync_model.anchored_excludes(rsync_model.SYSTEM_EXCLUDE, "/"))


def points(source="/", exclude=DEFAULT, extra=(), not_dirs=("/etc/hostname",)):
    return [m.point for m in mounts.skipped(ALL, source, exclude, extra, not_dirs)]


CASES = {
    "the default excludes": (
        {}, ["/boot", "/boot/efi", "/home", "/srv/cache", "/srv/my data", "/var",
             "/var/lib/docker/x"]),
    "extra sources cover their own mount, not one below it": (
        {"extra": ("/home", "/boot/")}, ["/boot/efi", "/srv/cache", "/srv/my data", "/var",
                                         "/var/lib/docker/x"]),
    "no excludes: /run, /tmp and a tmpfs below them are reported, pseudo ones never": (
        {"exclude": ()}, ["/boot", "/boot/efi", "/home", "/run", "/run/user/1000",
                          "/srv/cache", "/srv/my data", "/tmp", "/var", "/var/lib/docker/x"]),
    "a source below /: only what is under it, excludes relative to it": (
        {"source": "/srv", "exclude": ("/cache/*",)}, ["/srv/my data"]),
    "a source that is itself a mount: its own mount is not skipped": (
        {"source": "/var"}, ["/var/lib/docker/x"]),
    "an unanchored exclude matches a folder anywhere": (
        {"exclude": (*DEFAULT, "docker/", "efi")}, ["/boot", "/home", "/srv/cache",
                                                    "/srv/my data", "/var"]),
    "a folder excluded above the mount": (
        {"exclude": (*DEFAULT, "/srv", "/var/lib/*")}, ["/boot", "/boot/efi", "/home",
                                                        "/var"]),
    "a file mount point is copied as a file, so reported when not known as a file": (
        {"not_dirs": ()}, ["/boot", "/boot/efi", "/etc/hostname", "/home", "/srv/cache",
                           "/srv/my data", "/var", "/var/lib/docker/x"]),
}


@pytest.mark.parametrize("kwargs,expected", CASES.values(), ids=CASES.keys())
def test_skipped(kwargs, expected):
    assert points(**kwargs) == expected


def test_stacked_mounts_the_last_one_counts():
    # /srv/cache: a tmpfs, then an ext4 on top of it; the ext4 is what the server sees.
    cache = [m for m in mounts.skipped(ALL, "/", DEFAULT) if m.point == "/srv/cache"]
    assert [m.fstype for m in cache] == ["ext4"]


def test_only_pseudo_file_systems_below_the_source():
    text = "\n".join(line for line in MOUNTINFO.splitlines()
                     if " - ext4 /dev/sda1" in line or " - proc " in line or " - sysfs " in line)
    assert mounts.skipped(mounts.parse_mountinfo(text), "/", (), (), ["/etc/hostname"]) == []


@pytest.mark.parametrize("relative,patterns,expected", [
    ("/run", ["/run/*"], True),
    ("/run/user/1000", ["/run/*"], True),
    ("/running", ["/run/*"], False),
    ("/var/tmp", ["/var/tmp/*"], True),
    ("/var", ["/var/tmp/*"], False),
    ("/home", ["/home"], True),
    ("/home", ["/home/"], True),
    ("/data/home", ["home"], True),
    ("/data/homes", ["home"], False),
    ("/a/b/c", ["b/c"], True),
    ("/a/xb/c", ["b/c"], False),
    ("/mnt/disk1", ["/mnt/disk?"], True),
])
def test_excluded(relative, patterns, expected):
    assert mounts.excluded(relative, patterns) is expected


def test_unescape():
    assert mounts.unescape(r"/srv/a\040b\134c") == "/srv/a b\\c"
