"""Every per-OS difference pullback knows, in one table.

A row describes one OS family or one release: how sshd is reloaded (systemd unit, or the
pid in its pidfile), where its binaries are, what ``sshd -T -C`` needs, which package
manager installs a C toolchain, and whether the row was proven here (``tested``: the lab's
matrix test runs setup-remote, build-rsync and a backup against that release) or only
taken from the vendor's documentation. Code asks the table (``lookup``) instead of
branching on distribution names; facts read from the host (``sshd -T``, the active systemd
unit, the OpenSSH release from sshd's banner or ``ssh -V``) always win over a row's defaults.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

RESTRICT_SINCE = (7, 2)  # OpenSSH release that knows the authorized_keys `restrict` option
# `sshd -T -C` applies Match blocks for one connection. Old OpenSSH releases require all of
# user, host and addr; every tested release accepts any subset. pullback always passes all.
SSHD_T_KEYS = ("user", "host", "addr")


@dataclass(frozen=True)
class PackageManager:
    name: str  # the binary probed with ``command -v``
    install: tuple[str, ...]  # argv before the package names
    packages: tuple[str, ...]  # a C compiler, make, libc and ACL headers (rsync -A)
    refresh: tuple[str, ...] = ()  # run first: a fresh Debian image has empty apt lists

    @property
    def commands(self) -> list[list[str]]:
        return ([list(self.refresh)] if self.refresh else []) + [[*self.install, *self.packages]]


# Debian's gcc only recommends libc6-dev, so a minimal image can have gcc without headers.
APT = PackageManager(
    "apt-get",
    ("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y"),
    ("gcc", "make", "libc6-dev", "libacl1-dev"),
    refresh=("apt-get", "update"),
)
DNF = PackageManager("dnf", ("dnf", "install", "-y"), ("gcc", "make", "libacl-devel"))
YUM = PackageManager("yum", ("yum", "install", "-y"), ("gcc", "make", "libacl-devel"))

# Probe order for the toolchain install. zypper and apk have no platform row: they only
# install a compiler for build-rsync (documented, not tested); sshd facts there come from
# the host alone.
PACKAGE_MANAGERS: tuple[PackageManager, ...] = (
    APT,
    DNF,
    YUM,
    PackageManager("zypper", ("zypper", "--non-interactive", "install"),
                   ("gcc", "make", "libacl-devel")),
    PackageManager("apk", ("apk", "add", "--no-cache"), ("build-base", "acl-dev")),
)


@dataclass(frozen=True)
class Platform:
    name: str
    os_ids: tuple[str, ...]  # /etc/os-release ID (or an ID_LIKE entry) that selects the row
    codename: str = ""  # VERSION_CODENAME; "" = any release of the family
    kernel: str = "Linux"  # `uname -s`: selects the row when there is no /etc/os-release
    server: bool = True  # can be backed up (runs the restricted sshd side)
    client: bool = True  # can run the pull (backup, build-rsync's local end)
    service: str | None = "ssh"  # systemd unit that runs sshd
    pidfile: str | None = "/run/sshd.pid"  # sshd's default PidFile (reload without systemd)
    package_manager: PackageManager | None = APT
    sshd_binaries: tuple[str, ...] = ("/usr/sbin/sshd",)  # sshd and the helpers it execs
    sshd_t_keys: tuple[str, ...] = SSHD_T_KEYS
    openssh: tuple[int, int] | None = None  # the release's OpenSSH (oldest in the family)
    init: str = "systemd"  # what the scheduler installs units for
    gnu_tools: bool = True  # GNU stat -c, base64 -w0, sha256sum (the gather scripts use them)
    tested: bool = False
    source: str = ""  # where the row's facts come from
    toolchain_hint: str = ""  # how to get a compiler when there is no package manager

    @property
    def sshd(self) -> str:
        return self.sshd_binaries[0]

    @property
    def build_packages(self) -> tuple[str, ...]:
        return self.package_manager.packages if self.package_manager else ()

    @property
    def restrict(self) -> bool | None:
        """Whether the release's OpenSSH knows `restrict` (None: version unknown)."""
        return None if self.openssh is None else supports_restrict(self.openssh)


LAB = "tested here: debootstrap image in the lab, tests/integration/test_matrix.py"
DEBIAN_DOCS = "Debian's openssh-server packaging (not tested for this release)"

PLATFORMS: tuple[Platform, ...] = (
    Platform("debian-bullseye", ("debian",), "bullseye", openssh=(8, 4), tested=True,
             source=LAB),
    Platform("debian-bookworm", ("debian",), "bookworm", openssh=(9, 2), tested=True,
             source=LAB),
    # OpenSSH 9.8 split sshd into a listener and per-connection helpers; 10.0 (trixie) adds
    # sshd-auth. `sshd -t` fails when a helper is missing.
    Platform("debian-trixie", ("debian",), "trixie", openssh=(10, 0), tested=True,
             sshd_binaries=("/usr/sbin/sshd", "/usr/lib/openssh/sshd-session",
                            "/usr/lib/openssh/sshd-auth"),
             source=LAB),
    Platform("debian", ("debian",), source=DEBIAN_DOCS),
    # Since 22.10 Ubuntu starts ssh.service from ssh.socket; the unit is active once anyone
    # has logged in, which the admin connection has.
    Platform("ubuntu", ("ubuntu",), openssh=(8, 2),
             source="Ubuntu server guide, OpenSSH (20.04 and newer; not tested)"),
    Platform("rhel", ("rhel", "centos", "rocky", "almalinux", "fedora"), service="sshd",
             pidfile="/var/run/sshd.pid", package_manager=DNF, openssh=(8, 0),
             source="RHEL 8-10 documentation, OpenSSH chapter (not tested)"),
    # A backup client only: no GNU coreutils (BSD stat and base64 take other options),
    # sshd is run by launchd, and scheduling is a launchd agent, not a systemd timer.
    Platform("macos", ("macos",), kernel="Darwin", server=False, service=None, pidfile=None,
             package_manager=None, init="launchd", gnu_tools=False,
             source="Apple's launchd and command line tools documentation (not tested)",
             toolchain_hint="install Apple's command line tools: xcode-select --install"),
)

DEFAULT = next(p for p in PLATFORMS if p.name == "debian")  # unknown Linux: Debian defaults


def supports_restrict(openssh: tuple[int, int]) -> bool:
    return openssh >= RESTRICT_SINCE


def lookup(os_id: str = "", codename: str = "", id_like: Iterable[str] = (),
           kernel: str = "") -> Platform | None:
    """The most specific row: ID + codename, then ID, then an ID_LIKE entry, then kernel."""
    ids = [i for i in (os_id.lower(), *(x.lower() for x in id_like)) if i]
    if os_id and codename:
        for row in PLATFORMS:
            if row.codename == codename.lower() and os_id.lower() in row.os_ids:
                return row
    for wanted in ids:
        for row in PLATFORMS:
            if not row.codename and wanted in row.os_ids:
                return row
    if kernel and not ids:
        for row in PLATFORMS:
            if row.kernel == kernel and row.kernel != "Linux":
                return row
    return None


def connection_spec(addr: str, user: str = "root") -> str:
    """The ``sshd -T -C`` argument for a connection from ``addr`` as ``user``."""
    values = {"user": user, "host": addr, "addr": addr}
    return ",".join(f"{key}={values[key]}" for key in SSHD_T_KEYS)


def candidates(field: str) -> list[str]:
    """Every distinct value of a string (or first-of-tuple) field, in table order.

    The gather scripts run before the platform is known; they try these in order.
    """
    seen: dict[str, None] = {}
    for row in PLATFORMS:
        value = getattr(row, field)
        if isinstance(value, tuple):
            value = value[0] if value else None
        if value:
            seen[value] = None
    return list(seen)


def tested() -> list[Platform]:
    return [row for row in PLATFORMS if row.tested]
