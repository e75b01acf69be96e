"""The pullback module, in pullback's own ``/etc/pullback/rsyncd.conf``.

Everything here is pure: ``roles.hostfiles`` plans with it, reads and writes the files.

Why a file of our own: a module in the shared ``/etc/rsyncd.conf`` is served by ANY rsync
daemon on the host (Debian/Ubuntu's ``rsync.service`` starts whenever that file exists,
on TCP 873, to anyone), and the backup key's ``rsync --server --daemon .`` would reach
every other module of that file too. The forced command names our file instead
(``--config=/etc/pullback/rsyncd.conf``; rsync 2.6.9 honours it as well), which holds our
module only, 0600 root.

Migration: the previous version wrote the module into ``/etc/rsyncd.conf``.
``plan_legacy_removal`` takes it out again (marker line + section), byte for byte, and
leaves everything else in that file as it is.

Parsing follows rsync's ``params.c``/``loadparm.c``: ``#`` and ``;`` lines are comments,
a trailing backslash continues a line, parameter names compare case- and
whitespace-insensitively (``readonly`` is ``read only``), and so do section names.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from roles.core.diffs import split_lines, unified
from roles.core.hardened import FROM_ANY
from roles.core.render import render
from roles.remote.facts import PULLBACK_RSYNCD_CONF, RSYNCD_CONF

MARKER = "# managed by pullback"
DEFAULT_LOCK_FILE = "/var/run/rsyncd.lock"  # rsyncd's own default
PULLBACK_CONF = PULLBACK_RSYNCD_CONF  # ours alone; the forced command's --config
SHARED_CONF = RSYNCD_CONF  # every rsync daemon's; written only to migrate away

# Options the daemon refuses: everything that writes or deletes on the server. A pull
# never sends them (--delete is the receiver's, on the backup host; the client sends
# `--server --sender -vlogDtprxze.iLsfxCIvu --numeric-ids . PATH`). The one that matters
# for a pull is the sender's `--remove-source-files` (2.6.9: `--remove-sent-files`), which
# would delete the server's files after sending them; the rest only act when the server
# receives, which `read only = yes` already stops, and are refused in case it is ever
# flipped. Not refused: anything a pull sends (-a's letters, -z, -e, --numeric-ids...),
# else rsync refuses the normal pull. A name one rsync does not know (2.6.9 has no
# --append, --mkpath or --write-devices) is only logged ("No match for refuse-options
# string"), never an error.
REFUSE_OPTIONS = (
    "delete*", "remove-*", "backup*", "suffix", "partial-dir", "temp-dir", "inplace",
    "append*", "mkpath", "write-devices", "write-batch", "only-write-batch", "read-batch",
    "log-file*",
)
# Refusing these is what makes the key unable to delete server files: check_module says so.
REQUIRED_REFUSALS = ("delete*", "remove-*")

_MODULE_RE = re.compile(r"[A-Za-z0-9_-]+")
_HOST_RE = re.compile(r"[0-9A-Fa-f.:/]+")  # an address or address/mask, nothing to resolve
_TRUE = frozenset({"yes", "true", "on", "1"})
_FALSE = frozenset({"no", "false", "off", "0"})


@dataclass(frozen=True)
class RsyncdSettings:
    module: str = "system"
    path: str = "/"
    lock_file: str = "/run/rsyncd-pullback.lock"
    comment: str = "pullback full-system backup (read-only)"
    # `hosts allow` patterns: over ssh rsync takes the client's address from
    # $SSH_CONNECTION (sshd sets it; the client cannot). Empty: no hosts lines.
    hosts_allow: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _MODULE_RE.fullmatch(self.module):
            raise ValueError(f"module name {self.module!r}: use letters, digits, _ and -")
        if self.module.lower() == "global":
            raise ValueError("[global] is rsyncd's global section, not a module name")
        for label, value in (("path", self.path), ("lock file", self.lock_file)):
            if not value.startswith("/"):
                raise ValueError(f"{label} {value!r} must be an absolute path")
            _check_value(label, value)
        _check_value("comment", self.comment)
        for pattern in self.hosts_allow:
            if not _HOST_RE.fullmatch(pattern):
                raise ValueError(f"hosts allow {pattern!r}: an IP address or address/mask")


def _check_value(label: str, value: str) -> None:
    # rsyncd strips surrounding blanks, joins lines ending in "\" and expands %VAR%.
    if not value.isprintable() or value != value.strip() or value.endswith("\\"):
        raise ValueError(f"{label} {value!r}: printable text, no surrounding blanks or \\")
    if "%" in value:
        raise ValueError(f"{label} {value!r}: '%' would be read as a %VAR% reference")


@dataclass(frozen=True)
class Param:
    name: str  # as written, inner whitespace compressed
    value: str
    line: int  # index of its first physical line

    @property
    def key(self) -> str:
        return normalize(self.name)


@dataclass(frozen=True)
class Section:
    """``name`` is None for the global settings before the first ``[section]``.

    Lines ``[start, end)`` hold the header and the parameters; trailing comments and blank
    lines belong to whatever follows.
    """

    name: str | None
    start: int
    end: int
    params: tuple[Param, ...]

    @property
    def is_global(self) -> bool:
        return self.name is None or normalize(self.name) == "global"

    def get(self, key: str) -> str | None:
        """The value rsyncd uses: the last one set (``key`` compared normalized)."""
        wanted = normalize(key)
        values = [p.value for p in self.params if p.key == wanted]
        return values[-1] if values else None


@dataclass(frozen=True)
class RsyncdConf:
    lines: tuple[bytes, ...]
    sections: tuple[Section, ...]  # file order; the first is the global prelude
    directives: tuple[str, ...]  # &include / &merge lines

    @property
    def global_sections(self) -> tuple[Section, ...]:
        return tuple(s for s in self.sections if s.is_global)

    @property
    def modules(self) -> tuple[Section, ...]:
        return tuple(s for s in self.sections if not s.is_global)

    def find_module(self, name: str) -> tuple[Section, ...]:
        wanted = normalize(name)
        return tuple(s for s in self.modules if normalize(s.name or "") == wanted)

    def effective(self, module: str, key: str) -> str | None:
        """``key`` for ``module`` as rsyncd sees it: module value, else the global one
        set before the module first appears; None when neither sets it."""
        found = self.find_module(module)
        if not found:
            return None
        for section in reversed(found):
            value = section.get(key)
            if value is not None:
                return value
        for section in reversed(self.global_sections):
            if section.start < found[0].start:
                value = section.get(key)
                if value is not None:
                    return value
        return None


@dataclass(frozen=True)
class RsyncdPlan:
    """A whole-file change; ``new`` None: remove the file."""

    path: str
    old: bytes | None
    new: bytes | None
    warnings: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return self.old != self.new

    def diff(self) -> str:
        return unified(self.path, self.old, self.new)


def normalize(name: str) -> str:
    """rsyncd's comparison of parameter and section names (``strwicmp``)."""
    return "".join(name.split()).lower()


def render_module(settings: RsyncdSettings) -> str:
    """The whole of ``/etc/pullback/rsyncd.conf``."""
    return render(
        "rsyncd.conf.j2",
        module=settings.module,
        path=settings.path,
        comment=settings.comment,
        lock_file=settings.lock_file,
        refuse_options=" ".join(REFUSE_OPTIONS),
        hosts_allow=" ".join(settings.hosts_allow),
    )


def render_legacy_module(module: str) -> bytes:
    """The block the previous version wrote into /etc/rsyncd.conf, as it rendered it
    (setup-remote only ever changed the module name), to recognise it byte for byte."""
    return render("rsyncd.conf.legacy.j2", module=module, path="/",
                  comment="pullback full-system backup (read-only)",
                  lock_file="/run/rsyncd-pullback.lock").encode()


def hosts_allow_for(from_: str | None, client_addr: str) -> tuple[tuple[str, ...], list[str]]:
    """The module's ``hosts allow``, and warnings.

    The inventory's ``from`` when every pattern in it is an address or network (rsync
    reads those as sshd does); none with ``from: any`` (like the key line, which then has
    no ``from=``: ``roles.core.hardened.wanted_from``); otherwise the backup host's address
    as the server saw setup-remote's own login. A hostname or wildcard pattern is not
    copied: rsync would need a reverse DNS lookup to match it.
    """
    if from_ == FROM_ANY:
        return (), []
    if from_:
        patterns = [p.strip() for p in from_.split(",") if p.strip()]
        try:
            for pattern in patterns:
                ipaddress.ip_network(pattern, strict=False)
            return tuple(patterns), []
        except ValueError:
            pass
    try:
        ipaddress.ip_address(client_addr)
    except ValueError:
        return (), [f"the server did not report the backup host's address ({client_addr!r}):"
                    " the rsync module has no `hosts allow`"]
    return (client_addr,), []


def parse_rsyncd_conf(text: bytes) -> RsyncdConf:
    lines = split_lines(text)
    decoded = [ln.decode("utf-8", "surrogateescape").rstrip("\r\n") for ln in lines]
    sections: list[Section] = []
    directives: list[str] = []
    name: str | None = None
    start = 0
    end = 0
    params: list[Param] = []
    i = 0
    while i < len(decoded):
        stripped = decoded[i].strip()
        if not stripped or stripped[0] in "#;":
            i += 1
            continue
        if stripped[0] == "&":
            directives.append(stripped)
            i += 1
            continue
        if stripped[0] == "[":
            if "]" not in stripped:
                raise ValueError(f"rsyncd.conf line {i + 1}: section header without ']'")
            sections.append(Section(name, start, end, tuple(params)))
            name = " ".join(stripped[1 : stripped.index("]")].split())
            start, end, params = i, i + 1, []
            i += 1
            continue
        first = i
        logical = decoded[i]
        while logical.rstrip().endswith("\\") and i + 1 < len(decoded):
            i += 1
            logical = logical.rstrip()[:-1] + decoded[i]
        i += 1
        key, sep, value = logical.partition("=")
        if sep and key.strip():  # rsyncd ignores a line without '='
            params.append(Param(" ".join(key.split()), value.strip().replace("\r", ""), first))
            end = i
    sections.append(Section(name, start, end, tuple(params)))
    return RsyncdConf(tuple(lines), tuple(sections), tuple(directives))


def _extent(conf: RsyncdConf, section: Section) -> tuple[int, int]:
    """Lines of ``section`` plus our marker comment directly above its header."""
    start = section.start
    if start > 0 and conf.lines[start - 1].strip() == MARKER.encode():
        start -= 1
    return start, section.end


def plan_pullback_conf(current: bytes | None, settings: RsyncdSettings) -> RsyncdPlan:
    """Our own file holds our module and nothing else: whatever is there is replaced."""
    return RsyncdPlan(PULLBACK_CONF, current, render_module(settings).encode())


def plan_remove_pullback_conf(current: bytes | None) -> RsyncdPlan:
    """Captured mode serves no module: our file goes (the folder, empty, stays)."""
    return RsyncdPlan(PULLBACK_CONF, current, None)


def legacy_modules(conf: RsyncdConf) -> tuple[Section, ...]:
    """Modules with our marker directly above their header: the previous version's."""
    return tuple(s for s in conf.modules if _extent(conf, s)[0] < s.start)


def plan_legacy_removal(current: bytes | None) -> RsyncdPlan:
    """``/etc/rsyncd.conf`` without the module(s) the previous version put there.

    A marked module that is exactly what the old template rendered goes silently; one
    edited by hand since goes too (it still carries our marker and serves / to any
    daemon), with a warning: the old file stays as ``/etc/rsyncd.conf.pullback-bak`` and
    ``--dry-run`` shows the diff first. Everything else stays byte for byte: other
    modules, globals, comments, CRLF, a missing final newline. Two shapes of the old
    writer are undone exactly: a blank line it put between the last section and a module
    it appended at the end goes with the module, and a file that held nothing but our
    module is removed (an empty /etc/rsyncd.conf still starts Debian's rsync.service).
    """
    if not current:
        return RsyncdPlan(SHARED_CONF, current, current)
    conf = parse_rsyncd_conf(current)
    found = legacy_modules(conf)
    if not found:
        return RsyncdPlan(SHARED_CONF, current, current)
    warnings: list[str] = []
    lines = list(conf.lines)
    for section in reversed(found):  # bottom up: earlier line numbers stay valid
        start, end = _extent(conf, section)
        if b"".join(lines[start:end]) != render_legacy_module(section.name or ""):
            warnings.append(
                f"{SHARED_CONF}: [{section.name}] carries pullback's marker but was edited by "
                f"hand; removed anyway (it served / to any rsync daemon); the old file is kept "
                f"as {SHARED_CONF}.pullback-bak"
            )
        at_end = not any(ln.strip() for ln in lines[end:])
        del lines[start:end]
        if at_end and len(lines) >= 2 and lines[-1] == b"\n" and lines[-2].strip():
            del lines[-1]  # the separator the old writer added before an appended module
    new = b"".join(lines)
    return RsyncdPlan(SHARED_CONF, current, new if new else None, tuple(warnings))


def _parse_bool(value: str) -> bool | None:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    return None


def check_module(conf_text: bytes | str, module: str, *, path: str | None = "/") -> list[str]:
    """Problems with ``[module]`` for a full-system pull (empty list: none found).

    ``path=None`` skips the path comparison.
    """
    data = conf_text.encode() if isinstance(conf_text, str) else conf_text
    conf = parse_rsyncd_conf(data)
    found = conf.find_module(module)
    if not found:
        return [f"no [{module}] module in rsyncd.conf"]
    problems: list[str] = []
    if len(found) > 1:
        problems.append(f"[{module}] is defined {len(found)} times; rsyncd merges them")

    def get(key: str) -> str | None:
        return conf.effective(module, key)

    module_path = get("path")
    if module_path is None:
        problems.append("no path: rsyncd refuses a module without one")
    elif path is not None and (module_path.rstrip("/") or "/") != (path.rstrip("/") or "/"):
        problems.append(f"path is {module_path!r}, not {path!r}")
    for key in ("uid", "gid"):
        value = get(key)
        if value is None:
            problems.append(f"{key} is not set: a root daemon drops to nobody and cannot read /")
        elif value.split()[0] not in ("0", "root"):
            problems.append(f"{key} is {value!r}, not 0: the daemon cannot read all of /")
    problems.extend(_check_bool(get("read only"), "read only", want=True, default=True))
    problems.extend(_check_bool(get("write only"), "write only", want=False, default=False))
    problems.extend(_check_bool(get("list"), "list", want=False, default=True))
    max_conn = get("max connections")
    try:
        limit = int(max_conn) if max_conn is not None else 0
    except ValueError:
        limit = -1
        problems.append(f"max connections is {max_conn!r}, not a number")
    if limit == 0:
        problems.append("max connections is not set: overlapping pulls can run at once")
    elif limit > 0 and get("lock file") is None:
        problems.append(
            f"max connections without a lock file: rsyncd falls back to {DEFAULT_LOCK_FILE}"
        )
    refused = (get("refuse options") or "").split()
    lacking = [name for name in REQUIRED_REFUSALS if name not in refused]
    if lacking:
        problems.append(f"refuse options lacks {' '.join(lacking)}: the key could ask the "
                        "daemon to delete files (--remove-source-files, --delete)")
    return problems


def _check_bool(value: str | None, key: str, *, want: bool, default: bool) -> Iterable[str]:
    if value is None:
        if default != want:
            yield f"{key} is not set (defaults to {'yes' if default else 'no'})"
        return
    parsed = _parse_bool(value)
    if parsed is None:
        yield f"{key} is {value!r}, not a boolean"
    elif parsed != want:
        yield f"{key} is {value!r}, should be {'yes' if want else 'no'}"

