"""The backup key's line in root's ``authorized_keys``.

Everything here is pure: ``roles.hostfiles`` plans with it, reads and writes the file.
Reading the line back is here too, once (``find_key_line``, ``ForcedCommand``): setup-remote,
doctor and verify's checks all see the line sshd uses, and its flags as rsync reads them.

The "managed by pullback" marker lives in the key's COMMENT field (``pullback-backup``),
not on a ``#`` line of its own: this line is inserted among a user's own keys, and a
separate comment line would be left orphaned (or mistaken for ours) whenever keys are
moved around. The managed line is identified by its key blob, never by the comment, so a
user who edits the comment gets the line replaced, not duplicated.

Option quoting follows sshd (``auth-options.c``: ``opt_dequote``, and
``sshkey_advance_past_options``): inside a double-quoted value the only escape is ``\\"``;
any other backslash is literal. So we escape ``"`` and nothing else, and refuse a forced
command ending in a backslash (sshd would read the closing quote as escaped).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import fnmatch
import ipaddress
import os
import re
import shlex
import struct
from dataclasses import dataclass

from roles.core.diffs import split_lines, unified
from roles.core.hardened import CLASSIC_NO_OPTIONS, RESTRICT, RSYNCD_CONF
from roles.core.render import render
from roles.core.rsync import split_short
from roles.core.sshkeys import fingerprint_of

DEFAULT_COMMENT = "pullback-backup"

ACCEPTED_KEY_TYPES: tuple[str, ...] = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)

# Every type sshd may find at the start of a key (after the options), accepted or not:
# used to tell "options in front" from "no options" the way sshd does.
KNOWN_KEY_TYPES: frozenset[str] = frozenset(
    ACCEPTED_KEY_TYPES
    + ("ssh-dss", "ssh-xmss@openssh.com")
    + tuple(
        t.removesuffix("@openssh.com") + "-cert-v01@openssh.com"
        for t in (*ACCEPTED_KEY_TYPES, "ssh-dss", "ssh-xmss@openssh.com")
    )
)

# authorized_keys options sshd knows (auth-options.c; matched case-insensitively).
_FLAG_OPTIONS = frozenset(
    {"restrict", "cert-authority", "no-touch-required", "touch-required", "verify-required"}
    | {
        f"{prefix}{name}"
        for prefix in ("", "no-")
        for name in ("port-forwarding", "agent-forwarding", "x11-forwarding", "pty", "user-rc")
    }
)
_VALUE_OPTIONS = frozenset(
    {
        "command",
        "principals",
        "from",
        "expiry-time",
        "environment",
        "permitopen",
        "permitlisten",
        "tunnel",
    }
)
_SINGLE_VALUE_OPTIONS = frozenset({"command", "principals", "from"})


_FROM_RE = re.compile(r"[A-Za-z0-9.:*?!/,_-]+")
_BLANK = " \t"


@dataclass(frozen=True)
class PublicKey:
    type: str
    blob: str
    comment: str = ""

    def decoded(self) -> bytes:
        return base64.b64decode(self.blob, validate=True)


@dataclass(frozen=True)
class KeysPlan:
    """Desired authorized_keys content.

    ``replaced`` counts the existing lines that carried the backup key's blob (the first
    is rewritten in place, the rest are dropped); 0 means the line was appended.
    ``unrestricted_root_keys`` names the other keys without ``command=``: they stop
    working under ``PermitRootLogin forced-commands-only``.
    """

    old: bytes | None
    new: bytes
    changed: bool
    replaced: int
    unrestricted_root_keys: tuple[str, ...]

    def diff(self, path: str = "/root/.ssh/authorized_keys") -> str:
        return unified(path, self.old, self.new)


def parse_public_key(text: str) -> PublicKey:
    """Parse one public key (``TYPE BLOB [COMMENT]``) as found in a ``.pub`` file.

    Surrounding whitespace, including the file's final newline, is ignored.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty public key")
    if any(c in text for c in "\n\r\0"):
        raise ValueError("public key must be a single line")
    fields = text.split(None, 2)
    key_type = fields[0]
    if key_type == "ssh-dss":
        raise ValueError("ssh-dss: DSA keys are removed from current OpenSSH; use ed25519")
    if key_type not in ACCEPTED_KEY_TYPES:
        if key_type in KNOWN_KEY_TYPES:
            raise ValueError(f"unsupported key type {key_type!r} for the backup key")
        if "=" in key_type or "," in key_type or key_type.lower() in _FLAG_OPTIONS:
            raise ValueError("options in front of the key are not accepted: give a bare key")
        raise ValueError(f"unknown key type {key_type!r}")
    if len(fields) < 2:
        raise ValueError(f"{key_type} key has no base64 blob")
    blob = fields[1]
    try:
        decoded = base64.b64decode(blob, validate=True)
    except binascii.Error as err:
        raise ValueError(f"key blob is not valid base64: {err}") from None
    if len(decoded) < 4:
        raise ValueError("key blob is truncated")
    (name_len,) = struct.unpack(">I", decoded[:4])
    name = decoded[4 : 4 + name_len]
    if len(name) != name_len or name != key_type.encode():
        shown = name[:40].decode("ascii", "replace")
        raise ValueError(f"key blob is for {shown!r}, not {key_type!r}")
    comment = fields[2].strip() if len(fields) > 2 else ""
    return PublicKey(type=key_type, blob=blob, comment=comment)


def fingerprint(key: PublicKey) -> str:
    """``SHA256:...`` like ``ssh-keygen -l`` (unpadded base64 of the blob's SHA-256)."""
    return fingerprint_of(key.decoded())


def quote_option_value(value: str) -> str:
    """Double-quote ``value`` so that sshd's ``opt_dequote`` gives it back unchanged."""
    if value.endswith("\\"):
        raise ValueError(
            'an option value cannot end with a backslash: sshd reads \\" as an escaped quote'
        )
    return '"' + value.replace('"', '\\"') + '"'


def build_options(forced_command: str, *, restrict: bool, from_: str | None) -> list[str]:
    """Options for the backup key: ``restrict`` (OpenSSH >= 7.2), ``command``, ``from``,
    then the classic ``no-*`` options for older sshd and human readers."""
    if not forced_command.strip():
        raise ValueError("forced command is empty")
    if any(c in forced_command for c in "\n\r\0"):
        raise ValueError("forced command must not contain newline, CR or NUL")
    options = [RESTRICT] if restrict else []
    options.append("command=" + quote_option_value(forced_command))
    if from_ is not None:
        if not _FROM_RE.fullmatch(from_):
            raise ValueError(
                f"from={from_!r}: only letters, digits and . : * ? ! / , _ - are allowed"
            )
        options.append(f'from="{from_}"')
    options.extend(CLASSIC_NO_OPTIONS)
    return options


def render_key_line(key: PublicKey, options: list[str], *, comment: str = DEFAULT_COMMENT) -> str:
    """The authorized_keys line (without line ending), validated after rendering."""
    if not comment or not comment.isprintable():
        raise ValueError("key comment must be non-empty printable text")
    line = render("authorized_keys.j2", options=options, key=key, comment=comment)
    line = line.removesuffix("\n")
    validate_key_line(line)
    return line


def parse_options(line: str) -> tuple[list[str], str]:
    """Split an authorized_keys line into its options (raw, quotes kept) and the rest.

    Like sshd: a line whose first word is a key type has no options; otherwise the options
    run to the first blank outside double quotes, where ``\\"`` never toggles quoting.
    """
    line = line.lstrip(_BLANK)
    first = re.split(r"[ \t]", line, maxsplit=1)[0]
    if first in KNOWN_KEY_TYPES:
        return [], line
    options: list[str] = []
    start = 0
    quoted = False
    i = 0
    while i < len(line) and (quoted or line[i] not in _BLANK):
        char = line[i]
        if char == "\\" and line[i + 1 : i + 2] == '"':
            i += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            options.append(line[start:i])
            start = i + 1
        i += 1
    if quoted:
        raise ValueError("unbalanced double quote in key options")
    options.append(line[start:i])
    return options, line[i:].lstrip(_BLANK)


def split_option(option: str) -> tuple[str, str | None]:
    """``name="value"`` -> (name, dequoted value); a flag -> (name, None)."""
    name, sep, raw = option.partition("=")
    if not sep:
        if name.lower() not in _FLAG_OPTIONS:
            raise ValueError(f"unknown key option {option!r}")
        return name, None
    if name.lower() not in _VALUE_OPTIONS:
        raise ValueError(f"unknown key option {name!r}")
    if not raw.startswith('"'):
        raise ValueError(f"{name}= value must be double-quoted")
    value: list[str] = []
    i = 1
    while i < len(raw) and raw[i] != '"':
        if raw[i] == "\\" and raw[i + 1 : i + 2] == '"':
            i += 1
        value.append(raw[i])
        i += 1
    if i >= len(raw):
        raise ValueError(f"{name}= value has no closing quote")
    if i != len(raw) - 1:
        raise ValueError(f"unexpected text after the quoted {name}= value")
    return name, "".join(value)


def validate_key_line(line: str, *, forced_command: str | None = None) -> PublicKey:
    """Re-parse a rendered line: known options that round-trip through sshd's quoting,
    exactly one forced command (equal to ``forced_command`` when given), known key type."""
    if any(c in line for c in "\n\r\0"):
        raise ValueError("key line must be a single line")
    options, rest = parse_options(line)
    seen: dict[str, str | None] = {}
    for option in options:
        name, value = split_option(option)
        lowered = name.lower()
        if lowered in _SINGLE_VALUE_OPTIONS and lowered in seen:
            raise ValueError(f"more than one {name}= option")
        seen[lowered] = value
        if value is not None and f"{name}={quote_option_value(value)}" != option:
            raise ValueError(f"option {option!r} does not round-trip through sshd's quoting")
    command = seen.get("command")
    if command is None:
        raise ValueError("key line has no command= option")
    if forced_command is not None and command != forced_command:
        raise ValueError(f"forced command is {command!r}, expected {forced_command!r}")
    return parse_public_key(rest)


@dataclass(frozen=True)
class _Entry:
    options: tuple[str, ...]
    type: str
    blob: str
    comment: str


def _parse_entry(text: str) -> _Entry | None:
    """A key line's parts, or None for blank, comment and unparseable lines."""
    stripped = text.strip(_BLANK)
    if not stripped or stripped.startswith("#"):
        return None
    options, rest = parse_options(stripped)
    fields = rest.split(None, 2)
    if len(fields) < 2 or fields[0] not in KNOWN_KEY_TYPES:
        return None
    comment = fields[2].strip() if len(fields) > 2 else ""
    return _Entry(tuple(options), fields[0], fields[1], comment)



def _body_and_eol(line: bytes) -> tuple[bytes, bytes]:
    for eol in (b"\r\n", b"\n"):
        if line.endswith(eol):
            return line[: -len(eol)], eol
    return line, b""


def _describe(entry: _Entry) -> str:
    try:
        label = fingerprint(PublicKey(entry.type, entry.blob))
    except (binascii.Error, ValueError):
        label = f"{entry.type} {entry.blob[:20]}..."
    return f"{label} {entry.comment}" if entry.comment else label


def plan_authorized_keys(current: bytes | None, line: str | None, key: PublicKey) -> KeysPlan:
    """Put ``line`` (the backup key's rendered line) into ``current``; None removes it.

    Every other line is kept byte for byte. The managed line is the first line carrying
    ``key.blob``: it is rewritten in place (with that line's own ending) and later lines
    with the same blob are dropped. Without one, the line is appended using the file's
    line ending (that of its first line), after adding a missing final newline. With
    ``line=None`` every line carrying ``key.blob`` is dropped: the key grants nothing.
    """
    if line is not None:
        entry = _parse_entry(line)
        if entry is None or entry.blob != key.blob or "\n" in line or "\r" in line:
            raise ValueError("the key line must be one authorized_keys line for this key")
    wanted = line.encode() if line is not None else None
    if not current:
        if wanted is None:
            return KeysPlan(current, current or b"", False, 0, ())
        return KeysPlan(current, wanted + b"\n", True, 0, ())

    lines = split_lines(current)
    file_eol = _body_and_eol(lines[0])[1] or b"\n"
    out: list[bytes] = []
    replaced = 0
    unrestricted: list[str] = []
    for raw in lines:
        body, eol = _body_and_eol(raw)
        text = body.decode("utf-8", "surrogateescape")
        try:
            found = _parse_entry(text)
            ours = found is not None and found.blob == key.blob
        except ValueError:
            # Unbalanced quotes: sshd ignores the line; still ours if it holds our blob.
            found = None
            ours = key.blob in text.split()
        if ours:
            replaced += 1
            if replaced == 1 and wanted is not None:
                out.append(wanted + (eol or file_eol))
            continue
        if found is not None and not any(o.lower().startswith("command=") for o in found.options):
            unrestricted.append(_describe(found))
        out.append(raw)
    if not replaced and wanted is not None:
        if not out[-1].endswith(b"\n"):
            out[-1] += file_eol
        out.append(wanted + file_eol)
    new = b"".join(out)
    return KeysPlan(current, new, new != current, replaced, tuple(unrestricted))


def forced_command_of(content: bytes | None, blob: str) -> str | None:
    """The ``command=`` of the first authorized_keys line carrying ``blob`` (sshd uses the
    first), or None: no such line, no forced command, or a line that does not parse."""
    key = find_key_line(content, blob)
    return key.command if key is not None and not key.problem else None


# --- reading the backup key's line back, and its forced command -------------------------


@dataclass(frozen=True)
class ForcedCommand:
    """A key line's forced command: its text and its words."""

    text: str
    argv: tuple[str, ...]

    @property
    def binary(self) -> str:
        return self.argv[0] if self.argv else ""

    @property
    def is_rsync(self) -> bool:
        return "rsync" in os.path.basename(self.binary)

    @property
    def daemon(self) -> bool:
        return "--daemon" in self.argv

    @property
    def sender(self) -> bool:
        return "--server" in self.argv and "--sender" in self.argv

    @property
    def short_flags(self) -> str:
        """The flag letters of its short-option words, read as rsync's popt reads them
        (``roles.core.rsync.split_short``): what follows ``e`` (the capability string,
        ``e.iLsfxCIvu``) or another letter that takes an argument is not a flag."""
        return "".join(split_short(word)[0] for word in self.argv[1:])

    @property
    def dry_run(self) -> bool:
        return "n" in self.short_flags or "--dry-run" in self.argv

    @property
    def config(self) -> str:
        for word in self.argv:
            if word.startswith("--config="):
                return word.removeprefix("--config=")
        return RSYNCD_CONF

    def without_dry_run(self) -> tuple[str, ...]:
        """Its words with the dry run taken out: ``--dry-run``, and every ``n`` flag (never
        an ``n`` inside an option's argument)."""
        out: list[str] = []
        for word in self.argv:
            if word == "--dry-run":
                continue
            flags, letter, argument = split_short(word)
            if "n" in flags:
                word = "-" + flags.replace("n", "") + letter + argument
                if word == "-":
                    continue
            out.append(word)
        return tuple(out)


def parse_forced_command(text: str) -> ForcedCommand:
    """A ``command=`` value as words (shell quoting undone; split on blanks if it does not
    parse)."""
    try:
        argv = tuple(shlex.split(text))
    except ValueError:
        argv = tuple(text.split())
    return ForcedCommand(text, argv)


@dataclass(frozen=True)
class KeyLine:
    line: str
    options: tuple[str, ...]          # raw, quotes kept
    flags: frozenset[str]             # flag options, lower case
    command: str | None
    from_: str | None
    count: int                        # lines carrying the backup key's blob
    problem: str = ""                 # sshd cannot parse the options

    @property
    def forced(self) -> ForcedCommand | None:
        return parse_forced_command(self.command) if self.command is not None else None

    @property
    def missing_restrictions(self) -> list[str]:
        if RESTRICT in self.flags:
            return []
        return [o for o in CLASSIC_NO_OPTIONS if o.lower() not in self.flags]


def find_key_line(content: bytes | None, blob: str) -> KeyLine | None:
    """The first authorized_keys line carrying ``blob`` (sshd uses the first), parsed, with
    the number of lines that carry it. A line whose options sshd cannot parse is kept with
    its ``problem``. setup-remote, doctor and verify all read the line through this."""
    if not content:
        return None
    found: list[KeyLine] = []
    for raw in split_lines(content):
        text = raw.decode("utf-8", "surrogateescape").strip(" \t\r\n")
        if not text or text.startswith("#") or blob not in text:
            continue
        try:
            entry = _parse_entry(text)
        except ValueError as exc:
            if blob in text.split():
                found.append(KeyLine(text, (), frozenset(), None, None, 0, str(exc)))
            continue
        if entry is None or entry.blob != blob:
            continue
        flags: set[str] = set()
        values: dict[str, str] = {}
        problem = ""
        for option in entry.options:
            try:
                name, value = split_option(option)
            except ValueError as exc:
                problem = str(exc)
                continue
            if value is None:
                flags.add(name.lower())
            else:
                values.setdefault(name.lower(), value)
        found.append(KeyLine(text, entry.options, frozenset(flags), values.get("command"),
                             values.get("from"), 0, problem))
    if not found:
        return None
    return dataclasses.replace(found[0], count=len(found))


def from_allows(patterns: str, addr: str) -> bool:
    """sshd's ``from=`` for an address: a negated match refuses, else any match allows
    (host name patterns are not resolved here)."""
    allowed = False
    for raw in patterns.split(","):
        negated = raw.startswith("!")
        pattern = raw[1:] if negated else raw
        if "/" in pattern:
            try:
                hit = ipaddress.ip_address(addr) in ipaddress.ip_network(pattern, strict=False)
            except ValueError:
                hit = False
        else:
            hit = fnmatch.fnmatchcase(addr, pattern)
        if hit and negated:
            return False
        allowed = allowed or hit
    return allowed
