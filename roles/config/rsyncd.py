"""The pullback module in ``/etc/rsyncd.conf``.

Everything here is pure: the lead's gather/apply code reads and writes the file.

Parsing follows rsync's ``params.c``/``loadparm.c``: ``#`` and ``;`` lines are comments,
a trailing backslash continues a line, parameter names compare case- and
whitespace-insensitively (``readonly`` is ``read only``), and so do section names. A
section name seen twice is the SAME module: rsyncd merges the two and later values win,
so a second ``[system]`` could quietly turn ``read only`` off. The plan therefore keeps
exactly one copy of our module (the first, rewritten in place) and says so in
``warnings``. Module values override global ones, so global settings are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from roles.core.diffs import split_lines, unified
from roles.core.render import render

MARKER = "# managed by pullback"
DEFAULT_LOCK_FILE = "/var/run/rsyncd.lock"  # rsyncd's own default

_MODULE_RE = re.compile(r"[A-Za-z0-9_-]+")
_TRUE = frozenset({"yes", "true", "on", "1"})
_FALSE = frozenset({"no", "false", "off", "0"})


@dataclass(frozen=True)
class RsyncdSettings:
    module: str = "system"
    path: str = "/"
    lock_file: str = "/run/rsyncd-pullback.lock"
    comment: str = "pullback full-system backup (read-only)"

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
    old: bytes | None
    new: bytes
    changed: bool
    warnings: tuple[str, ...] = ()

    def diff(self, path: str = "/etc/rsyncd.conf") -> str:
        return unified(path, self.old, self.new)


def normalize(name: str) -> str:
    """rsyncd's comparison of parameter and section names (``strwicmp``)."""
    return "".join(name.split()).lower()


def render_module(settings: RsyncdSettings) -> str:
    return render(
        "rsyncd.conf.j2",
        module=settings.module,
        path=settings.path,
        comment=settings.comment,
        lock_file=settings.lock_file,
    )



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


def plan_rsyncd_conf(current: bytes | None, settings: RsyncdSettings) -> RsyncdPlan:
    """Our module freshly rendered into ``current``; everything else byte for byte."""
    block = render_module(settings).encode()
    if not current or not current.strip():
        return RsyncdPlan(current, block, current != block)
    conf = parse_rsyncd_conf(current)
    warnings: list[str] = []
    for directive in conf.directives:
        warnings.append(
            f"rsyncd.conf has {directive!r}: a [{settings.module}] defined there is not checked"
        )
    for other in conf.modules:
        start, _ = _extent(conf, other)
        if start < other.start and normalize(other.name or "") != normalize(settings.module):
            warnings.append(f"[{other.name}] is also managed by pullback: remove it if unused")
    found = conf.find_module(settings.module)
    lines = list(conf.lines)
    if not found:
        text = b"".join(lines)
        if not text.endswith(b"\n"):
            text += b"\n"
        if lines[-1].strip():  # a blank line between the last section and ours
            text += b"\n"
        return RsyncdPlan(current, text + block, True, tuple(warnings))
    if len(found) > 1:
        warnings.append(
            f"[{settings.module}] appeared {len(found)} times; rsyncd merges sections of the"
            f" same name, so the {len(found) - 1} later one(s) are removed"
        )
    # Work from the bottom so earlier line numbers stay valid.
    for section in reversed(found[1:]):
        start, end = _extent(conf, section)
        del lines[start:end]
    start, end = _extent(conf, found[0])
    lines[start:end] = [block]
    new = b"".join(lines)
    return RsyncdPlan(current, new, new != current, tuple(warnings))


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

