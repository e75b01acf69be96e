"""The restore drill's pure parts: the comparison per property, excludes, capabilities, table;
and the manifest of a real local tree (this machine runs tests as root)."""

from __future__ import annotations

import copy
import os
import subprocess

import pytest

from roles.core import drill
from roles.local import manifest

CAP_NET_RAW = "0100000200200000000000000000000000000000"  # setcap cap_net_raw+ep (v2)

SERVER = [
    {"p": "", "t": "d", "m": 0o755, "u": 0, "g": 0, "mt": 1_700_000_000_123_456_789},
    {"p": "a", "t": "f", "m": 0o644, "u": 0, "g": 0, "mt": 1, "sz": 3, "al": 4096, "h": "x",
     "ln": "1:10", "acl": {"access": "02"}, "x": {"user.note": "6869"}},
    {"p": "b", "t": "f", "m": 0o644, "u": 0, "g": 0, "mt": 1, "sz": 3, "al": 4096, "h": "x",
     "ln": "1:10"},
    {"p": "ping", "t": "f", "m": 0o755, "u": 0, "g": 0, "mt": 1, "sz": 9, "al": 4096, "h": "y",
     "x": {drill.CAPABILITY: CAP_NET_RAW}},
    {"p": "su", "t": "f", "m": 0o4755, "u": 0, "g": 0, "mt": 1, "sz": 9, "al": 4096, "h": "y"},
    {"p": "holes", "t": "f", "m": 0o644, "u": 0, "g": 0, "mt": 1, "sz": 10**8, "al": 0, "h": "z"},
    {"p": "null", "t": "c", "m": 0o666, "u": 0, "g": 0, "mt": 1, "rdev": [1, 3]},
    {"p": "link", "t": "l", "m": 0o777, "u": 0, "g": 0, "mt": 1, "l": "a"},
]


def changed(path: str, **fields) -> list[dict]:
    out = copy.deepcopy(SERVER)
    for item in out:
        if item["p"] == path:
            item.update(fields)
            for key in [k for k, v in fields.items() if v is None]:
                del item[key]
    return out


def test_an_exact_copy_has_no_differences():
    result = drill.compare(SERVER, copy.deepcopy(SERVER))
    assert result.differences == 0
    counts = {row.name: row.checked for row in result.rows}
    assert counts == {"entries": 8, "type": 8, "owner": 8, "group": 8, "mode": 7,
                      "setuid/setgid": 1, "mtime": 8, "content": 5, "hard links": 1,
                      "symlinks": 1, "devices": 1, "sparse": 1, "acls": 1, "xattrs": 1,
                      "capabilities": 1}


@pytest.mark.parametrize(("copy_", "row", "example"), [
    (changed("a", u=4242), "owner", "a: 0 on the server, 4242 in the copy"),
    (changed("a", g=7), "group", "a: 0 on the server, 7 in the copy"),
    (changed("a", m=0o600), "mode", "a: 0644 on the server, 0600 in the copy"),
    (changed("su", m=0o755), "setuid/setgid", "su: 4000 on the server, 0000 in the copy"),
    (changed("", mt=1_700_000_000_123_456_000), "mtime", ".: 1700000000123456789 on the "
                                                         "server, 1700000000123456000 in the copy"),
    (changed("b", ln="1:11"), "hard links", "a: linked on the server with ['b'], not in the copy"),
    (changed("a", acl=None), "acls", "a: access on the server, none in the copy"),
    (changed("a", x=None), "xattrs", "a: user.note on the server, none in the copy"),
    (changed("ping", x=None), "capabilities", "ping: cap_net_raw=ep on the server, none in the "
                                              "copy"),
    (changed("holes", al=10**8), "sparse", "holes: 0 of 100000000 bytes allocated on the server, "
                                           "100000000 of 100000000 bytes allocated in the copy"),
    (changed("null", rdev=[1, 5]), "devices", "null: [1, 3] on the server, [1, 5] in the copy"),
    (changed("link", l="b"), "symlinks", "link: a on the server, b in the copy"),
    (changed("a", h="other"), "content", "a: x on the server, other in the copy"),
    (changed("a", t="l"), "type", "a: f on the server, l in the copy"),
    ([i for i in SERVER if i["p"] != "su"], "entries", "su: missing in the copy"),
    ([*SERVER, {"p": "new", "t": "d", "m": 0, "u": 0, "g": 0, "mt": 0}], "entries",
     "new: only in the copy"),
])
def test_each_lost_property_is_one_difference_in_its_row(copy_, row, example):
    result = drill.compare(SERVER, copy_)
    assert result.row(row).differences == 1, drill.format_table(result)
    assert result.row(row).examples == [example]
    assert result.differences == 1


def test_whole_seconds_for_old_protocols():
    copy_ = changed("", mt=1_700_000_000_000_000_000)
    assert drill.compare(SERVER, copy_).differences == 1
    assert drill.compare(SERVER, copy_, mtime_resolution_ns=10**9).differences == 0


@pytest.mark.parametrize(("patterns", "prefix", "rel", "is_dir", "expected"), [
    (["/proc/*"], "", "proc", True, False),
    (["/proc/*"], "", "proc/1", True, True),
    (["/proc/*"], "", "proc/1/status", False, True),  # below an excluded folder
    (["/proc/*"], "", "srv/proc/1", True, False),    # anchored
    (["*.tmp"], "", "var/x/a.tmp", False, True),
    (["*.tmp"], "", "var/x/a.tmpx", False, False),
    (["cache/"], "", "var/cache", True, True),
    (["cache/"], "", "var/cache", False, False),      # folders only
    (["var/*/log"], "", "srv/var/a/log", False, True),
    (["var/*/log"], "", "var/a/b/log", False, False),  # * stays within a name
    (["var/**/log"], "", "var/a/b/log", False, True),
    (["/etc/secret"], "etc", "secret", False, True),  # drilling /etc of a / backup
    (["/etc/secret"], "etc", "etc/secret", False, False),
    ([], "", "anything", False, False),
])
def test_excludes_follow_rsyncs_rules(patterns, prefix, rel, is_dir, expected):
    assert drill.build_exclude(patterns, prefix)(rel, is_dir) is expected


def test_excluded_server_entries_are_not_missing():
    server = [*SERVER, {"p": "cache", "t": "d", "m": 0o755, "u": 0, "g": 0, "mt": 1},
              {"p": "cache/x", "t": "f", "m": 0o644, "u": 0, "g": 0, "mt": 1, "h": "q"}]
    result = drill.compare(server, SERVER, exclude=drill.build_exclude(["/cache/*", "/cache"]))
    assert result.differences == 0 and result.excluded == 2


@pytest.mark.parametrize(("value", "text"), [
    (CAP_NET_RAW, "cap_net_raw=ep"),
    ("0000000200200000000000000000000000000000", "cap_net_raw=p"),
    ("0000000300040000000000000000000000000000e8030000", "cap_net_bind_service=p [rootid=1000]"),
    ("0102", "raw 0102"),
    (None, None),
])
def test_capabilities_read_as_getcap_shows_them(value, text):
    assert drill.describe_capability(value) == text


def test_the_table_has_one_row_per_property_and_the_first_examples():
    text = drill.format_table(drill.compare(SERVER, changed("a", u=1)))
    lines = text.splitlines()
    assert lines[0].split() == ["property", "checked", "differences"]
    assert lines[3].split() == ["owner", "8", "1"]
    assert len(lines) == 1 + len(drill.PROPERTIES) + 1
    assert lines[-1] == "  owner: a: 0 on the server, 1 in the copy"


def test_the_manifest_of_a_real_tree_and_its_rsync_copies(tmp_path):
    """rsync -aHAXS keeps every property here; the notes' -avzx loses links, holes, caps."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("hi\n")
    os.link(src / "a", src / "b")
    os.setxattr(src / "a", "user.note", b"hello")
    os.setxattr(src / "a", "system.posix_acl_access", bytes.fromhex(
        "02000000" "0100" "0600" "ffffffff" "0200" "0400" "92100000"
        "0400" "0400" "ffffffff" "1000" "0400" "ffffffff" "2000" "0400" "ffffffff"))
    (src / "ping").write_bytes(b"\x7fELF")
    os.setxattr(src / "ping", drill.CAPABILITY, bytes.fromhex(CAP_NET_RAW))
    with open(src / "holes", "wb") as handle:
        handle.truncate(50 * 2**20)
    os.mknod(src / "null", 0o666 | 0o020000, os.makedev(1, 3))
    os.symlink("a", src / "link")
    (src / "su").write_bytes(b"x")
    os.chown(src / "su", 4242, 4243)  # before chmod: chown clears setuid
    os.chmod(src / "su", 0o4755)
    # Times from the past, nanoseconds included (rsync leaves an entry that is not a regular
    # file alone when the whole second already matches: a copy made within the same second
    # as the change would keep its own nanoseconds).
    for entry in [*src.iterdir(), src]:
        os.utime(entry, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789),
                 follow_symlinks=False)
    server = list(manifest.scan(src))
    assert {i["p"]: i for i in server}["a"]["acl"]  # the ACL reads back
    exact, plain = tmp_path / "exact", tmp_path / "plain"
    subprocess.run(["rsync", "-aHAXS", "--numeric-ids", f"{src}/", f"{exact}/"], check=True)
    subprocess.run(["rsync", "-avzx", "--numeric-ids", "-q", f"{src}/", f"{plain}/"],
                   check=True)
    good = drill.compare(server, list(manifest.scan(exact)))
    assert good.differences == 0, drill.format_table(good)
    lost = drill.compare(server, list(manifest.scan(plain)))
    assert {row.name: row.differences for row in lost.rows if row.differences} == {
        "hard links": 1, "sparse": 1, "acls": 2, "xattrs": 2, "capabilities": 1}  # a and b


def test_the_manifest_runs_as_a_script(tmp_path):
    (tmp_path / "f").write_text("x")
    from roles.features.drill import manifest_source

    out = subprocess.run(["python3", "-c", manifest_source(), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert [i["p"] for i in manifest.read(out)] == ["", "f"]


# --- extra sources: read on their own, merged at their place ----------------------------------


def test_extra_roots_and_merge_manifests():
    from types import SimpleNamespace

    from roles.features import drill as drill_reads

    host = SimpleNamespace(backup=SimpleNamespace(extra_sources=("/srv/a", "/srv/b/c", "/home")))
    assert drill_reads.extra_roots(host, "/srv") == [("/srv/a", "a"), ("/srv/b/c", "b/c")]
    assert drill_reads.extra_roots(host, "/") == [("/srv/a", "srv/a"), ("/srv/b/c", "srv/b/c"),
                                                  ("/home", "home")]
    assert drill_reads.extra_roots(host, "/srv/a") == []  # the drilled path itself: one read
    main = [{"p": "", "t": "d", "m": 0o755}, {"p": "a", "t": "d", "m": 0o700},
            {"p": "x", "t": "f", "m": 0o644}]
    part = [{"p": "", "t": "d", "m": 0o1777}, {"p": "f", "t": "f", "m": 0o600}]
    merged = drill_reads.merge_manifests(main, [("a", part)])
    assert sorted((i["p"], i["m"]) for i in merged) == [("", 0o755), ("a", 0o1777),
                                                        ("a/f", 0o600), ("x", 0o644)]
