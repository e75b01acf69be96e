"""The per-OS table: lookups, the facts that use it, and its agreement with its users."""

from __future__ import annotations

import pytest

from lab import hosts as lab
from roles.core import platforms
from roles.core.platforms import PLATFORMS, lookup
from roles.features import rsync_build as rb
from roles.remote import facts

BY_NAME = {row.name: row for row in PLATFORMS}


@pytest.mark.parametrize(
    ("os_id", "codename", "like", "kernel", "expected"),
    [
        ("debian", "bullseye", "", "Linux", "debian-bullseye"),
        ("debian", "bookworm", "", "Linux", "debian-bookworm"),
        ("debian", "trixie", "", "Linux", "debian-trixie"),
        ("debian", "forky", "", "Linux", "debian"),  # a release not in the table: family
        ("debian", "", "", "Linux", "debian"),  # sid has no VERSION_CODENAME
        ("ubuntu", "noble", "debian", "Linux", "ubuntu"),
        ("linuxmint", "wilma", "ubuntu debian", "Linux", "ubuntu"),  # through ID_LIKE
        ("rhel", "", "fedora", "Linux", "rhel"),
        ("rocky", "", "rhel centos fedora", "Linux", "rhel"),
        ("almalinux", "", "rhel centos fedora", "Linux", "rhel"),
        ("fedora", "", "", "Linux", "rhel"),
        ("", "", "", "Darwin", "macos"),  # no /etc/os-release: uname decides
        ("DEBIAN", "Trixie", "", "Linux", "debian-trixie"),
    ],
)
def test_lookup_picks_the_most_specific_row(os_id, codename, like, kernel, expected):
    row = lookup(os_id, codename, like.split(), kernel=kernel)
    assert row is not None and row.name == expected


@pytest.mark.parametrize(("os_id", "kernel"), [("arch", "Linux"), ("", "Linux"), ("", ""),
                                               ("alpine", "Linux")])
def test_lookup_of_an_unknown_os_is_none(os_id, kernel):
    assert lookup(os_id, kernel=kernel) is None


def test_service_and_pidfile_per_family():
    debian, rhel, macos = BY_NAME["debian"], BY_NAME["rhel"], BY_NAME["macos"]
    assert (debian.service, debian.pidfile) == ("ssh", "/run/sshd.pid")
    assert BY_NAME["ubuntu"].service == "ssh"
    assert (rhel.service, rhel.pidfile) == ("sshd", "/var/run/sshd.pid")
    assert rhel.package_manager is platforms.DNF
    assert rhel.build_packages == ("gcc", "make", "libacl-devel")
    assert debian.build_packages == ("gcc", "make", "libc6-dev", "libacl1-dev")
    assert (macos.server, macos.client, macos.init, macos.gnu_tools) == (
        False, True, "launchd", False)
    assert macos.package_manager is None and "xcode-select --install" in macos.toolchain_hint


def test_trixie_lists_the_split_sshd_binaries():
    assert BY_NAME["debian-trixie"].sshd_binaries == (
        "/usr/sbin/sshd", "/usr/lib/openssh/sshd-session", "/usr/lib/openssh/sshd-auth")
    assert BY_NAME["debian-bookworm"].sshd_binaries == ("/usr/sbin/sshd",)
    assert {row.sshd for row in PLATFORMS} == {"/usr/sbin/sshd"}


def test_exactly_the_lab_releases_are_marked_tested():
    tested = [row.name for row in platforms.tested()]
    assert tested == ["debian-bullseye", "debian-bookworm", "debian-trixie"]
    assert lab.RELEASES == ("bullseye", "bookworm", "trixie")
    for row in PLATFORMS:
        assert row.source, row.name  # every row says where its facts come from
        assert ("not tested" in row.source) != row.tested, row.name


def test_restrict_follows_the_openssh_version():
    assert platforms.supports_restrict((7, 2)) and not platforms.supports_restrict((7, 1))
    assert [BY_NAME[f"debian-{r}"].openssh for r in lab.RELEASES] == [(8, 4), (9, 2), (10, 0)]
    assert all(BY_NAME[f"debian-{r}"].restrict for r in lab.RELEASES)
    assert BY_NAME["debian"].restrict is None  # unknown release: the host's OpenSSH release decides


def test_sshd_T_spec_passes_user_host_and_addr():
    assert platforms.connection_spec("10.0.0.7") == "user=root,host=10.0.0.7,addr=10.0.0.7"
    assert all(row.sshd_t_keys == platforms.SSHD_T_KEYS for row in PLATFORMS)


def test_rsync_build_uses_the_tables_package_managers():
    assert rb.PACKAGE_MANAGERS is platforms.PACKAGE_MANAGERS
    names = [pm.name for pm in rb.PACKAGE_MANAGERS]
    assert names == ["apt-get", "dnf", "yum", "zypper", "apk"]
    for row in PLATFORMS:
        assert row.package_manager is None or row.package_manager in rb.PACKAGE_MANAGERS
    assert BY_NAME["macos"].toolchain_hint == rb.MACOS_HINT


def test_toolchain_probe_platform_comes_from_the_table():
    probe = rb.ToolchainFacts("", "", False, "", "Darwin")
    assert probe.platform is BY_NAME["macos"]
    debian = rb.ToolchainFacts("", "", False, "apt-get", "Linux", os_id="debian")
    assert debian.platform is BY_NAME["debian"]


def test_gather_script_tries_the_tables_units_and_binaries():
    script = facts.gather_script(["/usr/local/bin/rsync"])
    assert "for unit in ssh sshd; do" in script
    assert "for s in $(command -v sshd) /usr/sbin/sshd; do" in script
    assert '-T -C "user=root,host=$addr,addr=$addr"' in script
    assert "OSLIKE" in script


REPORT = """CLIENT 10.88.0.1
OS {os_id} {codename}
OSLIKE {like}
OPENSSH OpenSSH_8.7p1, OpenSSL 3.0.7 1 Nov 2022
SSHD /usr/sbin/sshd
{pidfile}END"""


@pytest.mark.parametrize(
    ("os_id", "codename", "like", "pidfile_line", "row", "pidfile"),
    [
        ("rocky", "", "rhel centos fedora", "", "rhel", "/var/run/sshd.pid"),
        ("debian", "trixie", "", "", "debian-trixie", "/run/sshd.pid"),
        ("arch", "", "", "", "debian", "/run/sshd.pid"),  # unknown Linux: Debian defaults
        ("rocky", "", "rhel", "T pidfile /run/sshd-custom.pid\n", "rhel",
         "/run/sshd-custom.pid"),  # sshd -T always wins over the table
    ],
)
def test_parsed_facts_map_to_a_platform(os_id, codename, like, pidfile_line, row, pidfile):
    parsed = facts.parse_report(REPORT.format(os_id=os_id, codename=codename, like=like,
                                              pidfile=pidfile_line))
    assert parsed.os_like == tuple(like.split())
    assert parsed.platform.name == row
    assert parsed.pidfile == pidfile


def test_a_report_without_oslike_still_parses():
    text = "CLIENT 10.0.0.1\nOS debian bookworm\nSSHD /usr/sbin/sshd\nEND"
    parsed = facts.parse_report(text)
    assert parsed.os_like == () and parsed.platform.name == "debian-bookworm"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bullseye,bookworm,trixie", ["bullseye", "bookworm", "trixie"]),
        (" Trixie , bookworm,trixie ", ["trixie", "bookworm"]),
    ],
)
def test_lab_parses_release_lists(text, expected):
    assert lab.parse_releases(text) == expected


@pytest.mark.parametrize("text", ["", " , ", "bookworm;rm -rf /", "../x"])
def test_lab_refuses_bad_release_lists(text):
    with pytest.raises(lab.LabError):
        lab.parse_releases(text)


def test_lab_names_one_container_per_release():
    assert lab.host_names("p", 2) == [("p-1", "bookworm"), ("p-2", "bookworm")]
    assert lab.host_names("p", 1, release="trixie") == [("p-1", "trixie")]
    assert lab.host_names("p", 1, ["bullseye", "trixie"]) == [
        ("p-bullseye", "bullseye"), ("p-trixie", "trixie")]
    assert lab.host_names("p", 2, ["trixie"]) == [("p-trixie-1", "trixie"),
                                                  ("p-trixie-2", "trixie")]
    with pytest.raises(lab.LabError):
        lab.host_names("p", 0)
