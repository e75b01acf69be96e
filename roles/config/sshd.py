"""Plan the sshd_config edit that makes the effective global PermitRootLogin a wanted value.

This module is the pure planning layer: it reads ``SshdFacts`` (gathered elsewhere) and
returns an ``SshdPlan`` holding the new bytes of exactly one file. No I/O happens here.

The model of sshd's parser (OpenSSH 8.x-10.x, ``servconf.c``):

- sshd takes the FIRST value it sees for PermitRootLogin, so an appended line is ignored
  when the keyword appears earlier, including in a drop-in that an ``Include`` near the top
  of the main file pulls in (Debian 12: ``Include /etc/ssh/sshd_config.d/*.conf``).
- ``Include`` args are globs, expanded in byte order (sshd runs in the C locale; a remote
  shell glob may sort by locale, so the matches are re-sorted here); a relative arg means
  ``/etc/ssh/<arg>``; recursion stops after 16 levels, as in sshd.
- ``Match`` starts a block that ends at the next ``Match`` or at the end of that file;
  ``Match all`` returns to global, with a twist: sshd re-applies matching Match blocks per
  connection, so a line after ``Match all`` beats an earlier plain global line.
- An ``Include`` inside a Match block is conditional, and so is everything in the files it
  pulls in (sshd parses them with ``SSHCFG_NEVERMATCH`` when the outer block does not
  match, so even their ``Match all`` stays conditional; checked with ``sshd -T -C``).
- Lines are split on ``\\n`` only, as sshd's ``getline`` does; a lone ``\\r`` is whitespace
  to sshd, not a line break, so ``bytes.splitlines`` would be wrong here.

Line numbers (``line_index``) are 0-based indexes into a file's lines; warnings print them
1-based, as editors do.
"""

import fnmatch
import re
from dataclasses import dataclass

from roles.core.diffs import split_lines, unified

SSH_DIR = "/etc/ssh"
PERMIT_ROOT_LOGIN_VALUES = frozenset(
    {"yes", "no", "prohibit-password", "without-password", "forced-commands-only"}
)
# sshd treats both spellings as the same setting; -T prints one or the other by version.
_SAME_SETTING = {"without-password": "prohibit-password"}
MAX_INCLUDE_DEPTH = 16  # SERVCONF_MAX_DEPTH in servconf.c

_WHITESPACE = " \t\r\n"  # WHITESPACE in OpenSSH's misc.h
_COMMENTED_DEFAULT = re.compile(rb"^\s*#\s*PermitRootLogin\b", re.IGNORECASE)
_CONNECTION_SPEC_FORBIDDEN = re.compile(r"[,=\s]")


@dataclass(frozen=True)
class SshdFacts:
    main_path: str  # "/etc/ssh/sshd_config"
    # absolute path -> raw content, main file + every file matched by an Include
    files: dict[str, bytes]
    # each Include argument as written in a config file -> matched absolute paths, sorted
    # lexically (what the remote shell glob gave); relative args are relative to /etc/ssh
    includes: dict[str, list[str]]


@dataclass(frozen=True)
class Decider:
    """The global PermitRootLogin line that sshd reads first: it sets the value."""

    path: str
    line_index: int
    value: str


@dataclass(frozen=True)
class MatchOverride:
    """A PermitRootLogin line that can override the global value for some connections."""

    path: str
    line_index: int
    match_line: str
    value: str


@dataclass(frozen=True)
class SshdPlan:
    path: str | None  # the file to change, None when nothing changes
    old: bytes | None
    new: bytes | None
    current: str | None  # effective global value before (None = not set => OpenSSH default)
    warnings: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return self.path is not None and self.old != self.new

    def diff(self) -> str:
        """Unified diff of the change, ``""`` when nothing changes."""
        if not self.changed or self.old is None or self.new is None or self.path is None:
            return ""
        return unified(self.path, self.old, self.new)


# --- parsing -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Line:
    """One directive line, decoded as latin-1 so every byte maps to one character."""

    indent: str
    keyword: str  # as spelled in the file
    separator: str  # the bytes between keyword and first argument: " ", "=", " = ", "\t"
    args: tuple[str, ...]


@dataclass(frozen=True)
class _Context:
    match_line: str | None  # None: global
    match_all_line: str | None  # set when global only thanks to a preceding `Match all`


@dataclass(frozen=True)
class _Directive:
    path: str
    line_index: int
    keyword: str  # lower case
    args: tuple[str, ...]
    context: _Context


_GLOBAL = _Context(None, None)


def _text_lines(content: bytes) -> list[str]:
    text = content.decode("utf-8", errors="replace")
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _line_end(line: bytes) -> bytes:
    for end in (b"\r\n", b"\n"):
        if line.endswith(end):
            return end
    return b""


def _display(text: str) -> str:
    """Turn a latin-1 decoded fragment back into readable text."""
    return text.encode("latin-1").decode("utf-8", errors="replace")


def _split_args(text: str) -> tuple[str, ...]:
    """Split arguments like OpenSSH's argv_split: whitespace, double quotes, `#` comments."""
    args: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _WHITESPACE:
            i += 1
        if i >= n or text[i] == "#":
            break
        arg: list[str] = []
        quoted = False
        while i < n:
            char = text[i]
            if char == "\\" and i + 1 < n and text[i + 1] in '"\\' + ("" if quoted else " "):
                arg.append(text[i + 1])
                i += 2
                continue
            if char == '"':
                quoted = not quoted
                i += 1
                continue
            if not quoted and char in _WHITESPACE:
                break
            arg.append(char)
            i += 1
        args.append("".join(arg))
    return tuple(args)


def _parse_line(raw: bytes) -> _Line | None:
    """Parse one config line the way servconf.c does; None for blank and comment lines."""
    body = raw.decode("latin-1").rstrip(_WHITESPACE + "\f")
    start = len(body) - len(body.lstrip(_WHITESPACE))
    if start == len(body) or body[start] == "#":
        return None
    end = start
    while end < len(body) and body[end] not in _WHITESPACE + '="':
        end += 1
    if end == start:
        return None
    # strdelim: the keyword ends at whitespace or "=", then one "=" and any whitespace go.
    value_start = end
    if value_start < len(body) and body[value_start] == "=":
        value_start += 1
    else:
        while value_start < len(body) and body[value_start] in _WHITESPACE:
            value_start += 1
        if value_start < len(body) and body[value_start] == "=":
            value_start += 1
    while value_start < len(body) and body[value_start] in _WHITESPACE:
        value_start += 1
    return _Line(
        indent=body[:start],
        keyword=body[start:end],
        separator=body[end:value_start],
        args=_split_args(body[value_start:]),
    )


def _glob_matches(pattern: str, path: str) -> bool:
    """glob(3) semantics for one path: `*` stays inside a component, skips dot files."""
    pattern_parts, path_parts = pattern.split("/"), path.split("/")
    if len(pattern_parts) != len(path_parts):
        return False
    for want, have in zip(pattern_parts, path_parts, strict=True):
        if have.startswith(".") and not want.startswith("."):
            return False
        if not fnmatch.fnmatchcase(have, want):
            return False
    return True


def _resolve_include(facts: SshdFacts, arg: str) -> list[str]:
    absolute = arg if arg.startswith(("/", "~")) else f"{SSH_DIR}/{arg}"
    for key in (arg, absolute):
        if key in facts.includes:
            return sorted(facts.includes[key])
    # Facts without this Include arg: every matched file is in `files`, so glob over them.
    return sorted(path for path in facts.files if _glob_matches(absolute, path))


def _walk_file(
    facts: SshdFacts, path: str, inherited: _Context, depth: int, out: list[_Directive]
) -> None:
    if depth > MAX_INCLUDE_DEPTH:
        raise ValueError(f"Include nesting deeper than {MAX_INCLUDE_DEPTH} at {path}")
    try:
        content = facts.files[path]
    except KeyError:
        raise ValueError(f"facts lack the content of {path}, which sshd reads") from None
    context = inherited
    for index, raw in enumerate(split_lines(content)):
        line = _parse_line(raw)
        if line is None:
            continue
        keyword = line.keyword.lower()
        if keyword == "match":
            text = _display(raw.decode("latin-1").strip(_WHITESPACE + "\f"))
            if inherited.match_line is not None:
                # A file included from a Match block never leaves that block.
                if len(line.args) == 1 and line.args[0].lower() == "all":
                    context = inherited
                else:
                    context = _Context(f"{inherited.match_line} / {text}", None)
            elif len(line.args) == 1 and line.args[0].lower() == "all":
                context = _Context(None, text)
            else:
                context = _Context(text, None)
            continue
        out.append(_Directive(path, index, keyword, line.args, context))
        if keyword == "include":
            for arg in line.args:
                for included in _resolve_include(facts, _display(arg)):
                    _walk_file(facts, included, context, depth + 1, out)


def _walk(facts: SshdFacts) -> list[_Directive]:
    """Every directive in the order sshd reads them, Includes expanded in place."""
    out: list[_Directive] = []
    _walk_file(facts, facts.main_path, _GLOBAL, 0, out)
    return out


def _value(directive: _Directive) -> str:
    return _display(directive.args[0]) if directive.args else ""


def _same_setting(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    return _SAME_SETTING.get(a, a) == _SAME_SETTING.get(b, b)


# --- finding ---------------------------------------------------------------------------


def _decider(directives: list[_Directive]) -> _Directive | None:
    plain: _Directive | None = None
    for directive in directives:
        if directive.keyword != "permitrootlogin" or directive.context.match_line is not None:
            continue
        if directive.context.match_all_line is not None:
            return directive
        if plain is None:
            plain = directive
    return plain


def find_permit_root_login(facts: SshdFacts) -> Decider | None:
    """The global PermitRootLogin line that decides the value, None when unset.

    That is the first one in sshd's reading order, except that a line in a ``Match all``
    section beats an earlier plain global line: sshd re-applies the matching Match blocks
    for every connection, after the global section, and ``Match all`` matches them all
    (checked with ``sshd -T`` on OpenSSH 9.2). Among ``Match all`` lines the first wins.
    """
    directive = _decider(_walk(facts))
    if directive is None:
        return None
    return Decider(directive.path, directive.line_index, _value(directive))


def find_match_overrides(facts: SshdFacts) -> list[MatchOverride]:
    """PermitRootLogin lines inside conditional Match blocks, in sshd's reading order."""
    return [
        MatchOverride(directive.path, directive.line_index, match_line, _value(directive))
        for directive in _walk(facts)
        if directive.keyword == "permitrootlogin"
        and (match_line := directive.context.match_line) is not None
    ]


# --- planning --------------------------------------------------------------------------


def _check_want(want: str) -> str:
    if want.lower() not in PERMIT_ROOT_LOGIN_VALUES:
        allowed = ", ".join(sorted(PERMIT_ROOT_LOGIN_VALUES))
        raise ValueError(f"PermitRootLogin {want!r} is not one of: {allowed}")
    return want.lower()


def _file_line_end(lines: list[bytes]) -> bytes:
    crlf = sum(line.endswith(b"\r\n") for line in lines)
    lf = sum(line.endswith(b"\n") for line in lines) - crlf
    return b"\r\n" if crlf > lf else b"\n"


def _replace_line(content: bytes, line_index: int, want: str) -> bytes:
    lines = split_lines(content)
    raw = lines[line_index]
    line = _parse_line(raw)
    if line is None:  # the walk found a directive here
        raise AssertionError(f"line {line_index + 1} holds no directive")
    # Keep " ", "=", " = " or a tab; anything odder (a bare keyword, a lone \r) gets " ".
    separator = line.separator if line.separator.strip(" \t=") == "" else " "
    separator = separator or " "
    # Trailing comments go: only newer sshd versions accept them after a value.
    text = f"{line.indent}{line.keyword}{separator}{want}"
    lines[line_index] = text.encode("latin-1") + _line_end(raw)
    return b"".join(lines)


def _is_blank(line: bytes) -> bool:
    return line.strip(b" \t\r\n\f") == b""


def _is_comment(line: bytes) -> bool:
    return line.lstrip(b" \t\r\f").startswith(b"#")


def _insert_global(content: bytes, want: str) -> bytes:
    """Insert `PermitRootLogin <want>` into the global section of the main file."""
    lines = split_lines(content)
    end = _file_line_end(lines)
    new_line = b"PermitRootLogin " + want.encode("ascii") + end
    first_match = next(
        (
            index
            for index, raw in enumerate(lines)
            if (line := _parse_line(raw)) is not None and line.keyword.lower() == "match"
        ),
        None,
    )
    global_end = len(lines) if first_match is None else first_match
    commented = [i for i in range(global_end) if _COMMENTED_DEFAULT.match(lines[i])]
    insert = [new_line]
    if commented:
        position = commented[-1] + 1
    elif first_match is not None:
        # Before the comment block that introduces the Match and the blank lines above it,
        # so the new global line does not read as part of the Match block.
        position = first_match
        while position > 0 and _is_comment(lines[position - 1]):
            position -= 1
        while position > 0 and _is_blank(lines[position - 1]):
            position -= 1
        if not _is_blank(lines[position]):
            insert.append(end)
    else:
        position = len(lines)
    if position > 0 and not lines[position - 1].endswith(b"\n"):
        lines[position - 1] += end
    lines[position:position] = insert
    return b"".join(lines)


def _warning(override: MatchOverride) -> str:
    return (
        f"{override.path}:{override.line_index + 1}: `{override.match_line}` sets "
        f"PermitRootLogin {override.value}; it may override the global value for the "
        f"connections it matches"
    )


def plan_permit_root_login(facts: SshdFacts, want: str = "forced-commands-only") -> SshdPlan:
    """Plan the smallest one-file edit that makes the global PermitRootLogin ``want``."""
    want = _check_want(want)
    decider = find_permit_root_login(facts)
    warnings = tuple(
        _warning(override)
        for override in find_match_overrides(facts)
        if not _same_setting(override.value, want)
    )
    current = decider.value if decider is not None else None
    if decider is not None and _same_setting(decider.value, want):
        return SshdPlan(None, None, None, current, warnings)
    if decider is not None:
        path = decider.path
        old = facts.files[path]
        new = _replace_line(old, decider.line_index, want)
    else:
        path = facts.main_path
        old = facts.files[path]
        new = _insert_global(old, want)
    return SshdPlan(path, old, new, current, warnings)


# --- checking the result with sshd -T --------------------------------------------------


def sshd_T_args(user: str, host: str, addr: str) -> list[str]:
    """argv for the effective config of one connection, Match blocks applied."""
    for name, value in (("user", user), ("host", host), ("addr", addr)):
        if not value or _CONNECTION_SPEC_FORBIDDEN.search(value):
            raise ValueError(f"{name} {value!r} is empty or holds a comma, `=` or whitespace")
    return ["sshd", "-T", "-C", f"user={user},host={host},addr={addr}"]
