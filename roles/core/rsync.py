"""rsync itself, pure: release numbers, what ``rsync --version`` prints, and the command a
pull sends to the server (``rsync --server --sender ...``), which captured mode forces."""

from __future__ import annotations

import hashlib
import json
import re

from roles.core.errors import PullbackError

_VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)(pre\d+)?$")
_VERSION_LINE_RE = re.compile(
    r"rsync\s+version\s+v?(?P<version>\S+)\s+protocol\s+version\s+(?P<protocol>\d+)"
)


def validate_version(version: str) -> str:
    """Return ``version`` if it looks like ``3.2.7`` or ``3.4.0pre1``, else raise."""
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ValueError(f"invalid rsync version {version!r}: expected e.g. 3.2.7 or 3.4.0pre1")
    return version


def version_key(version: str) -> tuple[int, int, int]:
    m = _VERSION_RE.match(validate_version(version))
    assert m is not None
    return int(m[1]), int(m[2]), int(m[3])


# Where build-rsync records what it built into a prefix (version, sum, flags), as JSON.
STAMP_RELPATH = "share/pullback/rsync.stamp"

# The newest release pullback pins (``roles.features.rsync_build.KNOWN_SHA256``): the default
# rsync.version. A unit test keeps the two in step.
DEFAULT_VERSION = "3.5.1"

# The oldest CLIENT rsync a backup runs without ``rsync.allow_vulnerable``: 3.4.0 fixed
# CVE-2024-12084..12088, through which the server a client pulls from can corrupt the
# client's memory, read its files or write outside the destination; 3.4.1 fixed 3.4.0's
# regressions. A backup host pulls from every server, so one compromised server is enough.
MIN_SAFE_CLIENT = "3.4.1"
CLIENT_CVES = "CVE-2024-12084..12088 (and the later fixes up to 3.4.x)"
_LEADING_RE = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?(pre\d+)?")


def release_key(version: str) -> tuple[int, int, int, int] | None:
    """A sortable key for a release as ``--version`` prints it (``3.2.7``, ``3.4.0pre1``,
    ``3.4.2dev``); a pre-release sorts before its release. None: not a version at all."""
    m = _LEADING_RE.match(version or "")
    if not m:
        return None
    return int(m[1]), int(m[2]), int(m[3] or 0), 0 if m[4] else 1


def client_exposure(version: str | None, subject: str = "the local rsync") -> str | None:
    """Why a CLIENT rsync of ``version`` is exposed to the servers it pulls from, or None
    when it is ``MIN_SAFE_CLIENT`` or newer. A version that cannot be read counts as exposed:
    nothing shows it has the fixes."""
    key = release_key(version) if version else None
    safe = release_key(MIN_SAFE_CLIENT)
    assert safe is not None
    if key is not None and key >= safe:
        return None
    shown = (f"is rsync {version}, older than {MIN_SAFE_CLIENT}" if key is not None
             else f"has a version pullback cannot read ({version!r}), not shown to be "
                  f"{MIN_SAFE_CLIENT} or newer")
    lacks = "lacks" if key is not None else "may lack"
    return (f"{subject} {shown}: it {lacks} the fixes for {CLIENT_CVES}, so any server it "
            "pulls from could attack this backup host")


def client_refusal(version: str | None, subject: str = "the local rsync") -> str | None:
    """The one-line refusal for an exposed client without ``rsync.allow_vulnerable``."""
    exposure = client_exposure(version, subject)
    if exposure is None:
        return None
    return (f"refused: {exposure}; fix: build {MIN_SAFE_CLIENT} or newer (rsync.version, "
            f"default {DEFAULT_VERSION}, then `invoke build-rsync --local-only`), or set "
            "rsync.allow_vulnerable: true knowingly")


def parse_version_output(text: str) -> tuple[str, int]:
    """``(version, protocol)`` from ``rsync --version`` output (2.6.9 through 3.5.x).

    ``rsync  version 3.2.7  protocol version 31``; pre-releases print a ``.PRn``
    sub-protocol after the number, git builds a ``v`` before the version.
    """
    for line in text.splitlines():
        m = _VERSION_LINE_RE.search(line)
        if m:
            return m["version"], int(m["protocol"])
    first = text.strip().splitlines()[0] if text.strip() else "<empty>"
    raise ValueError(f"not an rsync --version output: {first!r}")


# --- the default options per rsync release ---------------------------------------------------

# The original notes' options: archive, compress, one file system, numeric owners.
NOTES_OPTIONS = ("-avzx", "--numeric-ids", "--delete", "--progress")
# Both ends rsync >= 3.0: hard links, ACLs, xattrs (security.capability included) and holes.
DEFAULT_OPTIONS = ("-avzx", "-HAXS", "--numeric-ids", "--delete", "--progress")
# Either end rsync 2.6.9 (protocol 29): no -A/-X there; hard links and holes still work.
DEFAULT_OPTIONS_PROTOCOL29 = ("-avzx", "-HS", "--numeric-ids", "--delete", "--progress")
METADATA_SINCE = (3, 0, 0)  # -A/--acls and -X/--xattrs: rsync 3.0.0 (protocol 30)
SPARSE_COMBINES_SINCE = (3, 1, 3)  # --sparse with --inplace or --preallocate


def has_metadata_options(version: str) -> bool:
    """Whether rsync ``version`` has ``-A`` and ``-X`` (3.0.0 and later)."""
    return version_key(version) >= METADATA_SINCE


def default_options(version: str) -> tuple[str, ...]:
    """``backup.options`` when the inventory gives none, for ``rsync.version`` (the release
    both ends run: build-rsync installs it on each).

    ``-S`` alone is safe with every release: only its combination with ``--inplace`` or
    ``--preallocate`` was refused before 3.1.3, and the defaults hold neither.
    """
    return DEFAULT_OPTIONS if has_metadata_options(version) else DEFAULT_OPTIONS_PROTOCOL29


def _has_option(options: tuple[str, ...] | list[str], short: str, long: str) -> bool:
    for option in options:
        if option == long or option.startswith(long + "="):
            return True
        if re.fullmatch(r"-[A-Za-z]+", option) and short and short in option[1:]:
            return True
    return False


def check_options(options: tuple[str, ...] | list[str], version: str) -> str | None:
    """Why ``options`` cannot run with rsync ``version`` on both ends, or None (one line)."""
    if not has_metadata_options(version):
        for short, long, what in (("A", "--acls", "ACLs"), ("X", "--xattrs", "xattrs")):
            if _has_option(options, short, long):
                return (f"{long} (-{short}, {what}) needs rsync 3.0 or later on both ends; "
                        f"rsync.version {version} (protocol 29) has no such option: remove it "
                        "(2.6.9 cannot copy ACLs or xattrs) or pin rsync 3.x")
    if version_key(version) < SPARSE_COMBINES_SINCE and _has_option(options, "S", "--sparse"):
        for other in ("--inplace", "--preallocate"):
            if _has_option(options, "", other):
                return (f"--sparse (-S) with {other} is refused by rsync before 3.1.3 "
                        f"(rsync.version {version}): drop one of them")
    return None


# --- what makes a full-system copy exact --------------------------------------------------

# Each property of an exact copy: the short letter, the long names that turn it on, and the
# names ``--no-NAME`` turns it off by (rsync reads options in order, so a later ``--no-p``
# undoes ``-a``'s p). -a is -rlptgoD, -D is --devices --specials.
_EXACT: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("recursive", "r", ("--recursive",)),
    ("links", "l", ("--links",)),
    ("perms", "p", ("--perms",)),
    ("times", "t", ("--times",)),
    ("group", "g", ("--group",)),
    ("owner", "o", ("--owner",)),
    ("devices", "D", ("--devices",)),
    ("specials", "D", ("--specials",)),
    ("one-file-system", "x", ("--one-file-system",)),
    ("numeric-ids", "", ("--numeric-ids",)),
    # --delete-excluded turns deleting on too (rsync's options.c: delete during).
    ("delete", "", ("--delete", "--del", "--delete-before", "--delete-during",
                    "--delete-delay", "--delete-after", "--delete-excluded")),
    ("hard-links", "H", ("--hard-links",)),
    ("sparse", "S", ("--sparse",)),
    ("acls", "A", ("--acls",)),
    ("xattrs", "X", ("--xattrs",)),
)
_SHOWN = {"recursive": "-r", "links": "-l", "perms": "-p", "times": "-t", "group": "-g",
          "owner": "-o", "devices": "-D", "specials": "-D", "one-file-system": "-x",
          "numeric-ids": "--numeric-ids", "delete": "--delete", "hard-links": "-H",
          "sparse": "-S", "acls": "-A", "xattrs": "-X"}
_ARCHIVE = ("recursive", "links", "perms", "times", "group", "owner", "devices", "specials")
# Options that copy something else than the server holds: links followed or dropped,
# modes, owners or names rewritten, files skipped by what the copy already has.
INEXACT_OPTIONS = {
    "--copy-links": "copies what symlinks point to instead of the links (-L)",
    "--copy-dirlinks": "copies folders that symlinks point to instead of the links (-k)",
    "--copy-unsafe-links": "copies what some symlinks point to instead of the links",
    "--safe-links": "leaves out symlinks that point outside the tree",
    "--munge-links": "rewrites every symlink",
    "--chmod": "changes the copies' modes",
    "--chown": "changes the copies' owners",
    "--usermap": "changes the copies' owners",
    "--groupmap": "changes the copies' groups",
    "--existing": "copies no new files",
    "--ignore-existing": "leaves changed files as they were",
}
INEXACT_SHORT = {"L": "--copy-links", "k": "--copy-dirlinks"}


def exact_properties(version: str) -> tuple[str, ...]:
    """What every pull with rsync ``version`` on both ends must keep (-A/-X from 3.0)."""
    skip = () if has_metadata_options(version) else ("acls", "xattrs")
    return tuple(name for name, _, _ in _EXACT if name not in skip)


def _enabled(options: tuple[str, ...] | list[str]) -> set[str]:
    """The exactness properties ``options`` leave on, read in order as rsync reads them."""
    on: set[str] = set()
    for option in options:
        if option.startswith("--"):
            name = option.split("=", 1)[0]
            if name == "--archive":
                on.update(_ARCHIVE)
            if name.startswith("--no-"):
                off = name[len("--no-"):]
                if off in ("a", "archive"):  # not an rsync option; never turns anything on
                    continue
                on.difference_update(prop for prop, short, longs in _EXACT
                                     if off in (short, prop) or f"--{off}" in longs)
                continue
            on.update(prop for prop, _, longs in _EXACT if name in longs)
            continue
        flags, _, _ = split_short(option)
        for letter in flags:
            if letter == "a":
                on.update(_ARCHIVE)
            on.update(prop for prop, short, _ in _EXACT if short and letter == short)
    return on


def missing_exact(options: tuple[str, ...] | list[str], version: str) -> list[str]:
    """The options (as written: ``-x``, ``--numeric-ids``, ``-a`` for all of -rlptgoD) a
    pull with ``options`` lacks to copy a whole system exactly, in a fixed order."""
    missing = [name for name in exact_properties(version) if name not in _enabled(options)]
    if all(name in missing for name in _ARCHIVE):
        missing = ["archive", *(name for name in missing if name not in _ARCHIVE)]
    shown = [_SHOWN.get(name, "-a") for name in missing]
    return list(dict.fromkeys(shown))


def inexact_option(options: tuple[str, ...] | list[str]) -> str | None:
    """Why one of ``options`` makes the copy differ from the server, or None."""
    for option in options:
        if option.startswith("--"):
            name = option.split("=", 1)[0]
            if name in INEXACT_OPTIONS:
                return f"{option} {INEXACT_OPTIONS[name]}"
            continue
        flags, _, _ = split_short(option)
        for letter in flags:
            if letter in INEXACT_SHORT:
                long = INEXACT_SHORT[letter]
                return f"{option} holds -{letter}, which {INEXACT_OPTIONS[long].split(' (')[0]}"
    return None


_ONE_LONG = re.compile(r"--[A-Za-z0-9][A-Za-z0-9-]*")
_SHORT_FLAGS = re.compile(r"[A-Za-z0-9]*")


def option_shape_problem(item: str) -> str | None:
    """Why ``item`` (one list item of backup.options) is not exactly one option, or None.

    rsync gets each item as one argument: ``"-avzx --numeric-ids"`` would reach it as a
    single word (and its letters after ``e`` as -e's argument), ``"--bwlimit 1000"`` as an
    unknown option. A value may hold spaces only after ``=`` (``--filter=- *.tmp``).
    """
    words = item.split()
    if len(words) > 1 and any(word.startswith("-") for word in words[1:]):
        return (f"{item!r} is {len(words)} words in one item: write one option per item, "
                f"e.g. [{', '.join(words)}]")
    if item != item.strip():
        return f"{item!r} has spaces around it: one option per item, no spaces"
    if item.startswith("--"):
        name, equals, _ = item.partition("=")
        if not _ONE_LONG.fullmatch(name):
            hint = f" (write {words[0]}={' '.join(words[1:])})" if len(words) > 1 else ""
            return f"{item!r} is not one option: a long option is --name or --name=value{hint}"
        return None
    flags, letter, argument = split_short(item)
    if not _SHORT_FLAGS.fullmatch(flags) or (letter and argument[:1].isspace()):
        return (f"{item!r} is not one option: short options are letters after one '-' "
                "(-avzx), a value follows its letter directly (-B1024)")
    return None


# --- what a full-system pull leaves out by default ---------------------------------------

# Pseudo and volatile paths of the server, as absolute paths there: kernel file systems
# (/proc, /sys), devices (/dev: the kernel makes them at boot), runtime state (/run), scratch
# space (/tmp, /var/tmp), downloaded packages (apt's archives) and swap files. ``-x`` already
# skips a folder that is a mount of its own; these hold no data worth a copy either way.
# ``DIR/*`` leaves out the contents but keeps DIR itself, its owner and mode (/tmp's 1777):
# a restored system needs the mount points. backup.system_exclude overrides the list.
SYSTEM_EXCLUDE = ("/proc/*", "/sys/*", "/dev/*", "/run/*", "/tmp/*", "/var/tmp/*",
                  "/var/cache/apt/archives/*", "/swapfile", "/swap.img")


def anchored_excludes(patterns: tuple[str, ...] | list[str], source: str) -> list[str]:
    """``patterns`` (absolute paths on the server) as rsync ``--exclude`` patterns of a pull
    of ``source``: anchored at the transfer root, i.e. relative to ``source``. A pattern
    outside ``source``, or naming ``source`` itself or a folder above it, is dropped: a
    pull of /var/tmp means to copy /var/tmp."""
    top = source.rstrip("/")
    out = []
    for pattern in patterns:
        fixed = re.split(r"[*?\[]", pattern, maxsplit=1)[0]  # the literal part
        path = fixed.rstrip("/") if fixed != pattern else pattern.rstrip("/")
        if not top:
            out.append(pattern)
        elif path.startswith(top + "/") and pattern[len(top):].strip("/*"):
            out.append(pattern[len(top):])
    return out


# Characters that need no quoting in sh (a subset of shlex's safe set): the gate compares
# and execs these words literally, so nothing in them may be special to the shell.
SAFE_WORD = re.compile(r"[A-Za-z0-9._,:=+@%/-]+")
SERVER_PREFIX = ("rsync", "--server", "--sender")



# --- the command a pull sends, as captured mode forces it -----------------------------------


class CaptureError(PullbackError):
    """A captured command pullback cannot force, or a capture record that is missing,
    damaged or stale."""


def remote_path(source: str) -> str:
    """The path a pull of ``backup.source`` sends: ``/`` or ``/srv/data/`` (see source_spec)."""
    inner = source.strip("/")
    return f"/{inner}/" if inner else "/"


def remote_paths(source: str, extra_sources: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Every path a pull sends (``roles.core.pull.source_specs``): ``remote_path(source)``
    alone, or with extra sources (below ``source``) ``/SOURCE/./`` and ``/SOURCE/./REL/``
    each, for ``-R``: the ``/./`` marks where the path in DEST starts."""
    if not extra_sources:
        return [remote_path(source)]
    top = remote_path(source) + "./"
    inner = source.strip("/")
    below = [e.strip("/")[len(inner):].strip("/") for e in extra_sources]
    return [top, *(f"{top}{rel}/" for rel in below)]


# rsync's short options that take an argument (its popt table: -B --block-size, -e --rsh,
# -f --filter, -M --remote-option, -T --temp-dir, -@ --modify-window). popt reads a word
# ``-abc`` letter by letter; at one of these the rest of the word (or, when nothing is left,
# the next word) is its argument, whatever letters it holds.
SHORT_WITH_ARGUMENT = "BefMT@"

# Sender-side options that write or run something on the server, as root in captured mode:
# never in a captured command. ``-M``/``--remote-option`` does not itself reach the server
# (the client sends the option it carries), but is refused on sight too.
WRITING_SENT = {
    "--remove-source-files": "deletes every file it sends from the server",
    "--remove-sent-files": "deletes every file it sends from the server",
    "--log-file": "makes the server's rsync write a log file (as root) where it says",
    "--log-file-format": "belongs to --log-file, a log file the server's rsync writes",
    "--rsh": "names a command to run",
    "--remote-option": "passes options to the server's rsync",
    "--daemon": "starts a daemon",
    "--config": "starts a daemon",
    "--write-batch": "writes a batch file",
    "--only-write-batch": "writes a batch file",
    "--read-batch": "reads a batch file instead of the server's files",
}
WRITING_SENT_PREFIXES = ("--remove-", "--log-file")
# Short ones, in a word of their own (rsync sends ``-B2048`` so; -e only inside the cluster).
WRITING_SHORT = {"e": "names a command to run (-e, --rsh)",
                 "M": "passes options to the server's rsync (-M, --remote-option)",
                 "T": "makes the server's rsync write into a folder (-T, --temp-dir)"}
# The capability string after ``e`` in the cluster: ``.`` or a pre-release's
# ``PROTOCOL.SUB``, then capability letters (``.iLsfxCIvu``); rsync's server_options().
_CAPABILITIES = re.compile(r"^(?:\.|\d+\.\d+)[A-Za-z]*$")


def split_short(word: str) -> tuple[str, str, str]:
    """``(flags, letter, argument)`` of a short-option word as rsync's popt reads it.

    ``-vlogDtprxze.iLsfxCIvu`` -> ``("vlogDtprxz", "e", ".iLsfxCIvu")``; ``-0n`` -> ``("0n",
    "", "")``; ``-B1024n`` -> ``("", "B", "1024n")``: after a letter of SHORT_WITH_ARGUMENT
    nothing in the word is an option (an ``n`` there is no dry run).
    """
    body = word[1:] if word.startswith("-") and not word.startswith("--") else ""
    for at, letter in enumerate(body):
        if letter in SHORT_WITH_ARGUMENT:
            return body[:at], letter, body[at + 1:]
    return body, "", ""


def writing_long_option(word: str) -> str | None:
    """Why the long option ``word`` (``--name`` or ``--name=value``) writes or runs
    something on the server, or None."""
    name = word.split("=", 1)[0]
    if name in WRITING_SENT:
        return WRITING_SENT[name]
    if name.startswith(WRITING_SENT_PREFIXES):
        return "writes or deletes on the server"
    return None


def flag_cluster(words: list[str] | tuple[str, ...]) -> tuple[str, str]:
    """``(flags, rest)`` of the short-option word (``-vlogDtprxze.iLsfxCIvu``).

    rsync's ``server_options()`` writes the flags, then (protocol 30 on) ``e`` and the
    capability string (``.iLsfxCIvu``), whose letters are not options and may include any
    letter: popt takes everything after ``e`` as -e's argument. 2.6.9 sends no ``e``. No
    other option that takes an argument is ever in the cluster; one is refused.
    """
    if len(words) < 4 or not words[3].startswith("-") or words[3].startswith("--"):
        raise CaptureError("the command has no short-option cluster after "
                           f"{' '.join(SERVER_PREFIX)}: {' '.join(words)!r}")
    flags, letter, argument = split_short(words[3])
    if letter and (letter != "e" or not _CAPABILITIES.match(argument)):
        raise CaptureError(
            f"the cluster {words[3]!r} holds -{letter} with the argument {argument!r}: rsync "
            "sends only flags there, then 'e' and its capability string; captured mode "
            "refuses anything else (-e as a command, -M, -T, -B, -f)")
    return flags, (letter + argument)


def validate_sent(text: str, source: str, *, dry_run: bool = False,
                  extra_sources: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """Check a captured command and return its words; raise CaptureError saying why not."""
    shown = text if len(text) < 300 else text[:300] + "..."
    if not text:
        raise CaptureError("the captured command is empty (the client sent no command)")
    words = text.split(" ")
    bad = [w for w in words if not SAFE_WORD.fullmatch(w)]
    if bad:
        raise CaptureError(
            f"the captured command {shown!r} contains characters the gate cannot compare "
            f"and run literally ({bad[0]!r}): use a backup.source with letters, digits and "
            "._,:=+@%/- only")
    if tuple(words[:3]) != SERVER_PREFIX:
        raise CaptureError(f"the captured command {shown!r} does not start with "
                           f"{' '.join(SERVER_PREFIX)!r}: this is not a pull by rsync")
    paths = remote_paths(source, extra_sources)
    tail = [".", *paths]
    if words[-len(tail):] != tail or len(words) < 5 + len(tail) - 1:
        what = "backup.source and extra_sources" if extra_sources else "backup.source"
        raise CaptureError(f"the captured command {shown!r} does not end with "
                           f"'{' '.join(tail)}' ({what}): options that move the arguments "
                           "off the command line (--secluded-args, -s) cannot be captured")
    flags, _ = flag_cluster(words)
    dry = "n" in flags
    for word in words[4:-len(tail)]:
        why = None
        if word.startswith("--"):
            why = writing_long_option(word)
            dry = dry or word == "--dry-run"
        elif word.startswith("-"):
            more, letter, _ = split_short(word)
            if letter in WRITING_SHORT:
                why = WRITING_SHORT[letter]
            dry = dry or "n" in more
        if why:
            raise CaptureError(
                f"the captured command {shown!r} holds {word!r}, which {why}: captured mode "
                "runs only sender options that read; remove it from backup.options")
    if dry != dry_run:
        if dry_run:
            raise CaptureError(f"the dry-run capture {shown!r} has no 'n' in its flags")
        raise CaptureError(f"the captured command {shown!r} holds the dry-run flag 'n': a "
                           "forced command captured with -n breaks every real run")
    return tuple(words)


def dry_run_variant(words: tuple[str, ...]) -> tuple[str, ...]:
    """The command the same client sends with ``-n``: ``n`` placed where rsync puts it.

    rsync's ``server_options()`` writes the cluster as ``v``... then ``b`` (--backup), ``u``
    (--update), then ``n``, then the rest: ``-vlogDtprxze.`` becomes ``-vnlogDtprxze.``.
    capture-command checks the result against a real ``-n`` capture.
    """
    flags, rest = flag_cluster(words)
    if "n" in flags:
        raise CaptureError("the command already holds the dry-run flag 'n'")
    at = len(flags) - len(flags.lstrip("v"))
    for letter in "bu":
        if flags[at:at + 1] == letter:
            at += 1
    return (*words[:3], "-" + flags[:at] + "n" + flags[at:] + rest, *words[4:])


def with_binary(words: tuple[str, ...], binary: str) -> tuple[str, ...]:
    """``words`` running ``binary`` (the remote rsync's full path) instead of ``rsync``."""
    if not binary.startswith("/") or not SAFE_WORD.fullmatch(binary):
        raise CaptureError(f"the remote rsync path {binary!r} is not an absolute path of "
                           "safe characters")
    return (binary, *words[1:])


def fingerprint(options: list[str] | tuple[str, ...], exclude: list[str] | tuple[str, ...],
                source: str, local_version: str, remote_version: str,
                extra_sources: list[str] | tuple[str, ...] = ()) -> str:
    """SHA-256 over what the captured command depends on (``extra_sources`` only when there
    are some: a record made before they existed keeps its fingerprint)."""
    data = {"options": list(options), "exclude": list(exclude), "source": source,
            "local_rsync": local_version, "remote_rsync": remote_version}
    if extra_sources:
        data["extra_sources"] = list(extra_sources)
    encoded = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()


# What a full-system copy needs from a 3.x build besides the basics: without the ACL
# headers at build time rsync says "no ACLs" and refuses -A ("ACLs are not supported on
# this client"), so the default -HAXS options would fail every backup.
REQUIRED_CAPABILITIES = ("ACLs", "xattrs")


def missing_capabilities(version_output: str) -> list[str]:
    """The capabilities of ``REQUIRED_CAPABILITIES`` that ``rsync --version`` lists as
    ``no X`` (only 3.x lists them; 2.6.9 has neither)."""
    text = " ".join(version_output.split())
    return [cap for cap in REQUIRED_CAPABILITIES if f"no {cap}" in text]

