"""A restore drill's comparison, pure: the server's tree against its restored copy.

Both sides come as manifests (``roles.local.manifest``: one dict per entry). Each property
is one row of the report: how many entries it checked on the server, how many differ in
the copy, and the first few differing paths. A drill passes with 0 differences in every row.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

SETID = 0o6000  # setuid and setgid
EXAMPLES = 5

# Row order of the report; the names are what operators read.
PROPERTIES = (
    "entries", "type", "owner", "group", "mode", "setuid/setgid", "mtime", "content",
    "hard links", "symlinks", "devices", "sparse", "acls", "xattrs", "capabilities",
)


@dataclass
class Row:
    name: str
    checked: int = 0
    differences: int = 0
    examples: list[str] = field(default_factory=list)

    def differ(self, path: str, detail: str) -> None:
        self.differences += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(f"{path or '.'}: {detail}")


@dataclass
class Comparison:
    rows: list[Row]
    excluded: int = 0  # server entries the backup's excludes leave out

    @property
    def differences(self) -> int:
        return sum(row.differences for row in self.rows)

    def row(self, name: str) -> Row:
        return next(row for row in self.rows if row.name == name)


# --- rsync's exclude patterns (the subset pullback documents) -----------------------------


def _pattern_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(char))
            else:
                out.append("[" + pattern[i + 1:end].replace("\\", "\\\\") + "]")
                i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def build_exclude(patterns: Iterable[str], prefix: str = ""):
    """``excluded(rel, is_dir)`` for rsync ``--exclude`` patterns, paths relative to the
    drilled folder, which is ``prefix`` below the transfer root (``backup.source``).

    rsync's rules: a leading ``/`` anchors at the transfer root; a pattern with another
    ``/`` matches the path's end, one without matches the name; a trailing ``/`` only
    matches folders; ``*`` stays within a name, ``**`` does not. Everything below an
    excluded folder is excluded too.
    """
    rules: list[tuple[re.Pattern[str], bool]] = []
    for raw in patterns:
        pattern = raw.removeprefix("- ")
        dir_only = pattern.endswith("/") and pattern != "/"
        pattern = pattern.rstrip("/") if dir_only else pattern
        body = _pattern_regex(pattern.lstrip("/"))
        # Anchored: the whole path. Otherwise the path's end, at a name boundary (for a
        # pattern without '/', that is the name itself).
        regex = f"^{body}$" if pattern.startswith("/") else f"(?:^|/){body}$"
        rules.append((re.compile(regex), dir_only))
    base = prefix.strip("/")

    def full(rel: str) -> str:
        return f"{base}/{rel}".strip("/") if base else rel

    def matches(path: str, is_dir: bool) -> bool:
        for regex, dir_only in rules:
            if dir_only and not is_dir:
                continue
            if regex.search(path):
                return True
        return False

    def excluded(rel: str, is_dir: bool) -> bool:
        if not rules or not rel:
            return False
        path = full(rel)
        if matches(path, is_dir):
            return True
        parts = path.split("/")
        return any(matches("/".join(parts[:n]), True) for n in range(1, len(parts)))

    return excluded


# --- the comparison ------------------------------------------------------------------------


def _groups(entries: dict[str, dict]) -> set[frozenset[str]]:
    """Hard-link groups: the paths that share an inode (within the tree)."""
    by_key: dict[str, set[str]] = {}
    for path, item in entries.items():
        if "ln" in item:
            by_key.setdefault(item["ln"], set()).add(path)
    return {frozenset(paths) for paths in by_key.values() if len(paths) > 1}


def is_sparse(item: dict) -> bool:
    """Fewer bytes allocated than the size: the file has holes."""
    return item.get("t") == "f" and item.get("al", 0) < item.get("sz", 0)


def compare(server: Sequence[dict], copy: Sequence[dict], *, mtime_resolution_ns: int = 1,
            exclude=None) -> Comparison:
    """Compare the server's manifest with the copy's; ``exclude(rel, is_dir)`` names the
    server entries the backup leaves out on purpose (not counted as missing).

    ``mtime_resolution_ns``: 1 when both ends speak protocol 31 (rsync >= 3.1: nanoseconds),
    10**9 with older ones (whole seconds).
    """
    rows = {name: Row(name) for name in PROPERTIES}
    theirs = {item["p"]: item for item in server}
    mine = {item["p"]: item for item in copy}
    excluded = {p for p, item in theirs.items()
                if exclude is not None and exclude(p, item["t"] == "d")}
    theirs = {p: item for p, item in theirs.items() if p not in excluded}
    entries = rows["entries"]
    entries.checked = len(theirs)
    for path in sorted(theirs.keys() - mine.keys()):
        entries.differ(path, "missing in the copy")
    for path in sorted(mine.keys() - theirs.keys()):
        entries.differ(path, "only in the copy")
    for path in sorted(theirs.keys() & mine.keys()):
        a, b = theirs[path], mine[path]
        _compare_entry(rows, path, a, b, mtime_resolution_ns)
    links = rows["hard links"]
    server_groups, copy_groups = _groups(theirs), _groups(mine)
    links.checked = len(server_groups)
    for group in sorted(server_groups - copy_groups, key=sorted):
        links.differ(sorted(group)[0], f"linked on the server with {sorted(group)[1:]}, "
                                       "not in the copy")
    for group in sorted(copy_groups - server_groups, key=sorted):
        links.differ(sorted(group)[0], f"linked in the copy with {sorted(group)[1:]}, "
                                       "not on the server")
    return Comparison([rows[name] for name in PROPERTIES], excluded=len(excluded))


def _compare_entry(rows: dict[str, Row], path: str, a: dict, b: dict, resolution: int) -> None:
    def check(name: str, wanted: object, got: object, applies: bool = True) -> None:
        if not applies:
            return
        rows[name].checked += 1
        if wanted != got:
            rows[name].differ(path, f"{_show(wanted)} on the server, {_show(got)} in the copy")

    check("type", a["t"], b["t"])
    if a["t"] != b["t"]:
        return
    kind = a["t"]
    check("owner", a["u"], b["u"])
    check("group", a["g"], b["g"])
    # Symlink permissions mean nothing on Linux (always 0777) and rsync cannot set them.
    # setuid/setgid have their own row: a lost bit counts once.
    check("mode", f"{a['m'] & ~SETID:04o}", f"{b['m'] & ~SETID:04o}", kind != "l")
    check("setuid/setgid", f"{a['m'] & SETID:04o}", f"{b['m'] & SETID:04o}",
          bool((a["m"] | b["m"]) & SETID) and kind != "l")
    check("mtime", a["mt"] // resolution, b["mt"] // resolution)
    check("content", a.get("h"), b.get("h"), kind == "f")
    check("symlinks", a.get("l"), b.get("l"), kind == "l")
    check("devices", a.get("rdev"), b.get("rdev"), kind in ("c", "b"))
    if kind == "f" and (is_sparse(a) or is_sparse(b)):
        rows["sparse"].checked += 1
        if is_sparse(a) != is_sparse(b):
            rows["sparse"].differ(path, f"{_alloc(a)} on the server, {_alloc(b)} in the copy")
    check("acls", a.get("acl", {}), b.get("acl", {}), bool(a.get("acl") or b.get("acl")))
    ax = {k: v for k, v in a.get("x", {}).items() if k != CAPABILITY}
    bx = {k: v for k, v in b.get("x", {}).items() if k != CAPABILITY}
    check("xattrs", ax, bx, bool(ax or bx))
    ac, bc = a.get("x", {}).get(CAPABILITY), b.get("x", {}).get(CAPABILITY)
    if ac or bc:
        rows["capabilities"].checked += 1
        if ac != bc:
            rows["capabilities"].differ(path, f"{describe_capability(ac) or 'none'} on the "
                                              f"server, {describe_capability(bc) or 'none'} "
                                              "in the copy")


def _alloc(item: dict) -> str:
    return f"{item.get('al', 0)} of {item.get('sz', 0)} bytes allocated"


def _show(value: object) -> str:
    if value is None or value == {}:
        return "none"
    if isinstance(value, dict):
        return ",".join(sorted(value))
    return str(value)


# --- file capabilities (security.capability), for reading ----------------------------------

CAPABILITY = "security.capability"
CAP_NAMES = (
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid",
    "setuid", "setpcap", "linux_immutable", "net_bind_service", "net_broadcast", "net_admin",
    "net_raw", "ipc_lock", "ipc_owner", "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace",
    "sys_pacct", "sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time",
    "sys_tty_config", "mknod", "lease", "audit_write", "audit_control", "setfcap",
    "mac_override", "mac_admin", "syslog", "wake_alarm", "block_suspend", "audit_read",
    "perfmon", "bpf", "checkpoint_restore",
)


def describe_capability(value: str | None) -> str | None:
    """``security.capability`` (hex, as the manifest keeps it) as getcap shows it:
    ``cap_net_raw=ep``; the raw hex when it is not a v2/v3 capability set."""
    if value is None:
        return None
    data = bytes.fromhex(value)
    if len(data) < 20:
        return f"raw {value}"
    magic = int.from_bytes(data[0:4], "little")
    effective = magic & 1
    permitted = int.from_bytes(data[4:8], "little") | int.from_bytes(data[12:16], "little") << 32
    inheritable = (int.from_bytes(data[8:12], "little")
                   | int.from_bytes(data[16:20], "little") << 32)
    bits = permitted | inheritable
    names = [f"cap_{CAP_NAMES[bit]}" if bit < len(CAP_NAMES) else f"cap_{bit}"
             for bit in range(64) if bits >> bit & 1]
    flags = ("e" if effective else "") + ("p" if permitted else "") + ("i" if inheritable else "")
    text = f"{','.join(names)}={flags}" if names else "empty"
    if len(data) >= 24 and magic >> 24 == 3:
        text += f" [rootid={int.from_bytes(data[20:24], 'little')}]"
    return text


# --- the report ------------------------------------------------------------------------------


def format_table(comparison: Comparison) -> str:
    """One row per property: checked, differences, and the first differing paths."""
    rows = [("property", "checked", "differences")]
    rows += [(row.name, str(row.checked), str(row.differences)) for row in comparison.rows]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{row[0].ljust(widths[0])}  {row[1].rjust(widths[1])}  "
             f"{row[2].rjust(widths[2])}".rstrip() for row in rows]
    for row in comparison.rows:
        lines += [f"  {row.name}: {example}" for example in row.examples]
    return "\n".join(lines) + "\n"
