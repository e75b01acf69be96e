"""Load and validate ``inventory.yaml`` into merged hosts: validated by the pydantic models
here, handed on as ``roles.core.spec.HostSpec``.

Every problem is reported as one line: ``FILE:LINE: yaml.path: message``. Loading never
contacts a host. ``defaults:`` is deep-merged under each entry of ``hosts:`` (the host's
own value wins; lists are replaced, not concatenated).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from roles.core import destinations
from roles.core import rsync as rsync_model
from roles.core.rsync import DEFAULT_VERSION
from roles.core.spec import HostSpec, destination_of
from roles.inventory.selection import Inventory, InventoryError, read_inventory

DEFAULT_RSYNC_URL = "https://download.samba.org/pub/rsync/src/rsync-{version}.tar.gz"
# The defaults per rsync release live in roles.core.rsync (default_options); a host that
# gives no backup.options gets the ones its rsync.version supports (Host._options_for_version).
DEFAULT_OPTIONS = rsync_model.DEFAULT_OPTIONS
DEFAULT_SNAPSHOTS = 7

# The toolkit's own folder (the repository, or where it is installed): no DEST may hold it.
TOOLKIT = str(Path(__file__).resolve().parents[2])

# Options the toolkit itself owns or never lets a backup use: a user setting them would
# break the forced command or the safety of the pull. Checked by name (``--name=value``
# too); short options inside clusters (``-avn``, ``-0e...``) are read as rsync's popt
# reads them (roles.core.rsync.split_short).
RESERVED_OPTIONS = {
    "-n": "use `invoke backup --dry-run` instead of -n",
    "--dry-run": "use `invoke backup --dry-run` instead",
    "--list-only": "a listing is not a backup (nothing would be copied)",
    "-e": "the ssh command is built from the inventory",
    "--rsh": "the ssh command is built from the inventory",
    "--rsync-path": "the remote rsync comes from rsync.prefix",
    "-M": "options for the server's rsync would run there as root",
    "--remote-option": "options for the server's rsync would run there as root",
    "--remove-source-files": "a backup never deletes on the server",
    "--remove-sent-files": "a backup never deletes on the server",
    "--log-file": "pullback logs every run in DEST.pullback/logs",
    "--log-file-format": "pullback logs every run in DEST.pullback/logs",
    "--trust-sender": "it turns off the checks that protect this machine from a compromised "
                      "server",
    "--read-batch": "a batch is not a pull",
    "--write-batch": "a batch is not a pull",
    "--only-write-batch": "a batch is not a pull (nothing would be copied)",
    "--server": "internal rsync option",
    "--sender": "internal rsync option",
    "--daemon": "internal rsync option",
    "--config": "internal rsync option",
}
# Every option starting so is refused as well (rsync's --remove-*, --log-file*).
RESERVED_PREFIXES = {
    "--remove-": "a backup never deletes on the server",
    "--log-file": "pullback logs every run in DEST.pullback/logs",
}


def option_problem(option: str) -> str | None:
    """Why ``option`` (one item of backup.options) is refused, or None. Pure."""
    if option in ("-", "--") or not option.startswith("-"):
        return f"{option!r} is not an option (options start with '-')"
    if option.startswith("--"):
        name = option.split("=", 1)[0]
        why = RESERVED_OPTIONS.get(name) or next(
            (text for prefix, text in RESERVED_PREFIXES.items() if name.startswith(prefix)),
            None)
        if why:
            return f"{option!r} is not allowed here: {why}"
    shape = rsync_model.option_shape_problem(option)
    if shape:
        return shape
    if option.startswith("--"):
        return None
    flags, letter, _ = rsync_model.split_short(option)
    if "n" in flags:
        return f"{option!r} contains -n: use `invoke backup --dry-run` instead"
    if letter in ("e", "M"):
        return f"{option!r} contains -{letter}: {RESERVED_OPTIONS['-' + letter]}"
    return None


_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+(?:pre\d+)?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MODULE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FROM = re.compile(r"^[A-Za-z0-9.:*?!/,_-]+$")
_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# An IPv6 scope id names an interface (``fe80::1%eth0``, ``%2``). ipaddress accepts any
# characters there (spaces, ``;``, ``$(...)``), and the address ends up in ssh's and
# rsync's arguments and in from= patterns: only interface-name characters pass.
_ZONE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


# --- field validators -------------------------------------------------------------------


def _no_control(value: str) -> str:
    if _UNSAFE_CHARS.search(value):
        raise ValueError("must not contain control characters or newlines")
    return value


def _absolute_path(value: str) -> str:
    _no_control(value)
    expanded = str(Path(value).expanduser()) if value.startswith("~") else value
    if not expanded.startswith("/"):
        raise ValueError(f"must be an absolute path (or start with ~/), got {value!r}")
    if any(part == ".." for part in PurePosixPath(expanded).parts):
        raise ValueError(f"must not contain '..', got {value!r}")
    return expanded


def _address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        _, percent, zone = value.partition("%")
        if percent and not _ZONE.match(zone):
            raise ValueError(
                f"{value!r}: the IPv6 scope id {zone!r} is not an interface name (letters, "
                "digits, '.', '_', '-')"
            )
        return value
    if not _HOSTNAME.match(value) or ".." in value:
        raise ValueError(
            f"{value!r} is not a host name or IP address (letters, digits, '.', '-'; "
            "must not start with '-')"
        )
    return value


def _version(value: str) -> str:
    if not _VERSION.match(value):
        raise ValueError(f"{value!r} is not an rsync version like 3.2.7 or 2.6.9")
    return value


AbsPath = Annotated[str, AfterValidator(_absolute_path)]


def _option(value: str) -> str:
    _no_control(value)
    problem = option_problem(value)
    if problem:
        raise ValueError(problem)
    return value


# One rsync option per list item, checked item by item (the error names the item's line).
RsyncOption = Annotated[str, AfterValidator(_option)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class RsyncSettings(_Strict):
    version: Annotated[str, AfterValidator(_version)] = DEFAULT_VERSION
    # Lets the CLIENT run an rsync older than 3.4.1 (roles.core.rsync.MIN_SAFE_CLIENT), which
    # a compromised server can attack: only for a deliberate choice, e.g. the card's 2.6.9.
    allow_vulnerable: bool = False
    url: str = DEFAULT_RSYNC_URL
    mirrors: tuple[str, ...] = ()
    sha256: str | None = None
    prefix: AbsPath = "/usr/local"
    local_prefix: AbsPath = "/usr/local"
    gpg_keyring: AbsPath | None = None  # keyring file with upstream's signing keys (optional)

    @field_validator("url", "mirrors")
    @classmethod
    def _url(cls, value: Any) -> Any:
        for url in (value,) if isinstance(value, str) else value:
            _no_control(url)
            if "{version}" not in url:
                raise ValueError(f"{url!r} must contain '{{version}}'")
            if not re.match(r"^(https?|file)://", url):
                raise ValueError(f"{url!r} must be an http://, https:// or file:// URL")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256.match(value):
            raise ValueError("must be 64 lowercase hex digits (a SHA-256)")
        return value


class RetainSettings(_Strict):
    """Beside ``snapshots: N`` (the newest N): the newest snapshot of each of the last
    ``daily`` days, ``weekly`` ISO weeks and ``monthly`` months (roles.core.retention)."""
    daily: int = Field(default=0, ge=0, le=10000)
    weekly: int = Field(default=0, ge=0, le=10000)
    monthly: int = Field(default=0, ge=0, le=10000)


def _command(value: tuple[str, ...]) -> tuple[str, ...]:
    """backup.pre / backup.post: one argv list, run as root over the admin connection."""
    for word in value:
        _no_control(word)
    if value and not value[0]:
        raise ValueError("the command's first word (the program) must not be empty")
    return value


Command = Annotated[tuple[str, ...], AfterValidator(_command)]


class BackupSettings(_Strict):
    source: AbsPath = "/"
    # More server paths below source, each on a file system of its own (a separately
    # mounted /home, /boot...): -x leaves them out of the pull of source; listed here they
    # are pulled too, in the same rsync (-R, roles.core.pull.source_specs), to the same
    # relative place in DEST. doctor names the mounts the pull skips.
    extra_sources: tuple[AbsPath, ...] = ()
    destination: str = "/var/backups/pullback/{name}"
    # The whole option list, replacing the release's defaults; it must still hold what
    # makes the copy exact (roles.core.rsync.missing_exact) unless allow_inexact. After
    # validation ``options`` is what the pull runs: the base, extra_options, --bwlimit.
    options: tuple[RsyncOption, ...] = DEFAULT_OPTIONS
    extra_options: tuple[RsyncOption, ...] = ()
    bwlimit: int | None = Field(default=None, ge=1)  # KiB per second
    allow_inexact: bool = False
    exclude: tuple[str, ...] = ()
    # Paths on the server a pull leaves out (absolute; roles.core.rsync.SYSTEM_EXCLUDE):
    # a list here replaces the default, [] copies them all.
    system_exclude: tuple[str, ...] = rsync_model.SYSTEM_EXCLUDE
    # History by default: a server wiped or encrypted by ransomware must not overwrite
    # its only copy. 0 is one mirror (DEST/tree); N keeps the newest N hard-linked runs.
    snapshots: int = Field(default=DEFAULT_SNAPSHOTS, ge=0, le=10000)
    module: str = "system"
    max_delete: int | None = Field(default=None, ge=0)
    parallel: int = Field(default=4, ge=1, le=64)
    max_age: float = Field(default=36, gt=0)  # hours
    # One more root below which destinations may lie (roles.core.destinations); the lab
    # sets its state folder here.
    allow_destination: AbsPath | None = None
    retain: RetainSettings = RetainSettings()
    # Run on the server as root through the ADMIN connection, never the backup key:
    # pre before the pull (a failure stops it), post after it (docs/tasks.md).
    pre: Command = ()
    post: Command = ()
    # The receiving rsync (and its ssh) runs in a bubblewrap sandbox that may write only
    # DEST (roles.core.sandbox). false: no sandbox (no bwrap, e.g. not Linux; or trusted.*
    # xattrs must be kept).
    sandbox: bool = True
    # `invoke schedule` (systemd) gives this host its own instance, pullback-backup@NAME,
    # and timer; the shard's instance leaves it out.
    own_unit: bool = False

    @field_validator("destination")
    @classmethod
    def _destination(cls, value: str) -> str:
        _no_control(value)
        probe = value.replace("{name}", "host")
        if "{" in probe or "}" in probe:
            raise ValueError("may only use the placeholder {name}")
        if probe.startswith("~"):
            raise ValueError(f"must be an absolute path, got {value!r}")
        _absolute_path(probe)
        return value

    @field_validator("allow_destination")
    @classmethod
    def _allow(cls, value: str | None) -> str | None:
        problem = destinations.allow_problem(value) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("exclude")
    @classmethod
    def _exclude(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            _no_control(pattern)
            if not pattern:
                raise ValueError("an exclude pattern must not be empty")
        return value

    @field_validator("system_exclude")
    @classmethod
    def _system_exclude(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            _no_control(pattern)
            if not pattern.startswith("/") or pattern.strip("/*") == "":
                raise ValueError(f"{pattern!r} must be an absolute path on the server below / "
                                 "(e.g. /var/tmp/* or /swapfile)")
            if any(part == ".." for part in pattern.split("/")):
                raise ValueError(f"must not contain '..', got {pattern!r}")
        return value

    @model_validator(mode="after")
    def _extra_below_source(self) -> BackupSettings:
        top = self.source.rstrip("/")
        seen: list[str] = []
        for path in self.extra_sources:
            clean = path.rstrip("/")
            if clean in ("", top) or not clean.startswith(top + "/"):
                raise ValueError(f"extra_sources: {path!r} must be a path below "
                                 f"backup.source {self.source!r} (it is pulled into the same "
                                 "tree, at the same place)")
            if "/./" in clean + "/" or "//" in clean:
                raise ValueError(f"extra_sources: {path!r} must be a plain path "
                                 "(no '.' or empty parts)")
            if clean in seen:
                raise ValueError(f"extra_sources: {path!r} is listed twice")
            seen.append(clean)
        if tuple(seen) != self.extra_sources:
            object.__setattr__(self, "extra_sources", tuple(seen))
        return self

    @field_validator("module")
    @classmethod
    def _module(cls, value: str) -> str:
        if not _MODULE.match(value):
            raise ValueError(f"{value!r} is not a module name (letters, digits, '_', '-')")
        return value


def _ping_url(value: str | None) -> str | None:
    if value is None:
        return value
    _no_control(value)
    if not re.match(r"^https?://[^/\s]+", value) or " " in value:
        raise ValueError(f"{value!r} must be an http:// or https:// URL")
    return value.rstrip("/")


class MonitorSettings(_Strict):
    """Where a run reports: a healthchecks-style ping URL (``URL/start``, ``URL``,
    ``URL/fail``) and a Prometheus textfile-collector file (roles.local.ping, metrics)."""
    ping_url: Annotated[str | None, AfterValidator(_ping_url)] = None
    metrics_file: AbsPath | None = None

    @field_validator("metrics_file")
    @classmethod
    def _prom(cls, value: str | None) -> str | None:
        if value is not None and not value.endswith(".prom"):
            raise ValueError(f"{value!r} must end in .prom (the textfile collector reads "
                             "only those)")
        return value


class Host(_Strict):
    name: str
    address: Annotated[str, AfterValidator(_address)]
    port: int = Field(default=22, ge=1, le=65535)
    admin_user: str
    admin_key: AbsPath | None = None
    # validate_default: the default goes through _absolute_path too, so its ~ is expanded
    # (pydantic does not validate defaults otherwise; it stayed a relative ./~/.ssh/...).
    known_hosts: AbsPath = Field(default="~/.ssh/known_hosts", validate_default=True)
    backup_key: AbsPath
    from_: str | None = Field(default=None, alias="from")
    forced_command: Literal["captured", "daemon"] = "daemon"
    sudo_password: bool = False
    rsync: RsyncSettings = RsyncSettings()
    backup: BackupSettings = BackupSettings()
    monitor: MonitorSettings = MonitorSettings()

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"{value!r} is not a valid host name (letters, digits, '.', '_', '-'; "
                "must not start with '-')"
            )
        return value

    @field_validator("admin_user")
    @classmethod
    def _user(cls, value: str) -> str:
        if not _USER.match(value):
            raise ValueError(f"{value!r} is not a valid user name")
        if value == "root":
            raise ValueError("root cannot be the admin: once setup-remote sets PermitRootLogin "
                             "forced-commands-only, root logs in only to run the backup key's "
                             "command; use a user with sudo")
        return value

    @field_validator("from_")
    @classmethod
    def _from(cls, value: str | None) -> str | None:
        if value is not None and not _FROM.match(value):
            raise ValueError(
                f"{value!r} is not a from= pattern list (addresses, host names, * ? ! / ,)"
            )
        return value

    @model_validator(mode="after")
    def _options_for_version(self) -> Host:
        """The options the pull runs: ``backup.options`` (else the defaults of
        ``rsync.version``), then ``extra_options`` and ``--bwlimit``. They must keep what
        makes a full-system copy exact unless ``allow_inexact``, and run on that release."""
        version, backup = self.rsync.version, self.backup
        given = "options" in backup.model_fields_set
        base = backup.options if given else rsync_model.default_options(version)
        effective = (*base, *backup.extra_options,
                     *((f"--bwlimit={backup.bwlimit}",) if backup.bwlimit else ()))
        problem = rsync_model.check_options(effective, version)
        if problem:
            raise ValueError(f"backup.options: {problem}")
        if not backup.allow_inexact:
            missing = rsync_model.missing_exact(effective, version)
            if missing and given and rsync_model.missing_exact(base, version):
                raise ValueError(
                    f"backup.options: replaces the defaults and leaves out "
                    f"{' '.join(missing)}, which a full-system copy needs: put additions in "
                    "backup.extra_options (the defaults stay), or list those too, or set "
                    "backup.allow_inexact: true knowingly")
            if missing:
                raise ValueError(
                    f"backup.extra_options: turns off {' '.join(missing)}, which a "
                    "full-system copy needs (or set backup.allow_inexact: true knowingly)")
            inexact = rsync_model.inexact_option(effective)
            if inexact:
                field = ("backup.extra_options" if inexact.split()[0] in backup.extra_options
                         else "backup.options")
                raise ValueError(f"{field}: {inexact}: the copy would differ from the server "
                                 "(or set backup.allow_inexact: true knowingly)")
        if effective != backup.options:
            # Frozen model: swap in a copy that differs only in its (valid) options.
            object.__setattr__(self, "backup", backup.model_copy(update={"options": effective}))
        return self

    @model_validator(mode="after")
    def _destination_per_host(self) -> Host:
        keep_out = [("the backup key", self.backup_key), ("known_hosts", self.known_hosts),
                    ("the toolkit", TOOLKIT)]
        if self.admin_key:
            keep_out.append(("the admin key", self.admin_key))
        problem = destinations.destination_problem(
            destination_of(self.backup.destination, self.name),
            allow=self.backup.allow_destination, keep_out=keep_out)
        if problem:
            raise ValueError(f"backup.destination: {problem}")
        if self.backup.snapshots and self.backup.destination.rstrip("/") == "":
            raise ValueError("backup.destination must not be empty")
        retain = self.backup.retain
        if not self.backup.snapshots and (retain.daily or retain.weekly or retain.monthly):
            raise ValueError("backup.retain: needs snapshots (backup.snapshots is 0: one "
                             "mirror, nothing to retain)")
        return self


def spec_of(host: Host) -> HostSpec:
    """The validated host as the frozen, standard-library ``HostSpec`` every other layer
    reads (the computed values are its properties)."""
    return HostSpec.from_dict(host.model_dump())


def validate_host(data: dict[str, Any]) -> HostSpec:
    """One host's settings (merged, as ``load_text`` passes them), validated: pydantic's
    ValidationError on a problem."""
    return spec_of(Host.model_validate(data))


# --- loading with line numbers ----------------------------------------------------------

TOP_LEVEL = {"defaults", "hosts"}


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Problem(Exception):
    """A problem at a YAML node while building plain data: its line and one message."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


def _to_python(node: yaml.Node, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int],
               constructor: Any = None, active: tuple[int, ...] = ()) -> Any:
    """Build plain data from a composed YAML node, recording each path's line number.

    Scalars are built by PyYAML's safe constructor (an empty value is None); merge keys
    (``<<: *defaults``, or a list of aliases) are merged as YAML 1.1 says: the mapping's
    own keys win, then the merged mappings in order; a merged key keeps the line of the
    anchor it came from.
    """
    constructor = constructor or yaml.constructor.SafeConstructor()
    lines[path] = node.start_mark.line + 1
    if id(node) in active:
        raise _Problem(node.start_mark.line + 1, "an alias refers to itself (recursive anchor)")
    active = (*active, id(node))
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        merged: dict[Any, tuple[Any, dict[tuple[Any, ...], int]]] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                sources = (value_node.value if isinstance(value_node, yaml.SequenceNode)
                           else [value_node])
                for source in sources:
                    if not isinstance(source, yaml.MappingNode):
                        raise _Problem(source.start_mark.line + 1,
                                       "a merge key '<<' takes a mapping (an alias such as "
                                       "*defaults) or a list of them")
                    sub: dict[tuple[Any, ...], int] = {}
                    values = _to_python(source, path, sub, constructor, active)
                    for key, value in values.items():
                        if key not in merged:  # the first merged mapping wins
                            merged[key] = (value, {p: n for p, n in sub.items()
                                                   if p[:len(path) + 1] == (*path, key)})
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise _Problem(key_node.start_mark.line + 1, "a key must be a plain word")
            key = _scalar(key_node, constructor)
            if key in out:
                raise _Problem(key_node.start_mark.line + 1, f"duplicate key {key!r}")
            out[key] = _to_python(value_node, (*path, key), lines, constructor, active)
            lines[(*path, key)] = key_node.start_mark.line + 1
        for key, (value, sub) in merged.items():
            if key not in out:  # the mapping's own keys win over merged ones
                out[key] = value
                lines.update(sub)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(n, (*path, i), lines, constructor, active)
                for i, n in enumerate(node.value)]
    return _scalar(node, constructor)


def _scalar(node: yaml.Node, constructor: Any) -> Any:
    try:
        value = constructor.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError) as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise _Problem(node.start_mark.line + 1, f"not a value pullback reads: {problem}"
                       ) from None
    try:
        hash(value)
    except TypeError:
        raise _Problem(node.start_mark.line + 1, "a key must be a plain word") from None
    return value


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    return override


def _tuples(value: Any) -> Any:
    """YAML lists become tuples (the models are frozen and strict)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _dotted(path: Iterable[Any]) -> str:
    """``hosts.web1.backup.options[2]``: list items by index."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) and not isinstance(part, bool) else (
            f".{part}" if out else str(part))
    return out


EMPTY_VALUE = "has no value: write one, or delete the line for the default"


def _drop_empty(value: Any, path: tuple[Any, ...], empty: set[tuple[Any, ...]]) -> Any:
    """``value`` without its empty (None) entries, whose paths are added to ``empty``."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if item is None:
                empty.add((*path, key))
            else:
                out[key] = _drop_empty(item, (*path, key), empty)
        return out
    if isinstance(value, list):
        for i, item in enumerate(value):
            if item is None:
                empty.add((*path, i))
        return [_drop_empty(item, (*path, i), empty) for i, item in enumerate(value)
                if item is not None]
    return value


def load_text(text: str, source: str = "inventory.yaml") -> Inventory:
    """Parse and validate inventory text; raise InventoryError with one line per problem."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        position = getattr(exc, "position", None)  # a ReaderError: a character offset
        line = (f"{mark.line + 1}" if mark else
                f"{text.count(chr(10), 0, position) + 1}" if isinstance(position, int) else "1")
        problem = (getattr(exc, "problem", None) or getattr(exc, "reason", None)
                   or str(exc).splitlines()[0])
        raise InventoryError([f"{source}:{line}: not valid YAML: {problem}"]) from None
    lines: dict[tuple[Any, ...], int] = {}
    try:
        data = _to_python(root, (), lines) if root is not None else None
    except _Problem as exc:
        raise InventoryError([f"{source}:{exc.line}: {exc.message}"]) from None
    except RecursionError:
        raise InventoryError([f"{source}:1: the inventory nests too deeply"]) from None
    if not isinstance(data, dict):
        raise InventoryError([f"{source}:1: the inventory must be a mapping with 'hosts:'"])

    problems: list[str] = []

    def report(path: tuple[Any, ...], message: str) -> None:
        probe = path
        line = lines.get(probe)
        while line is None and probe:
            probe = probe[:-1]
            line = lines.get(probe)
        problems.append(f"{source}:{line or 1}: {_dotted(path) or '(top)'}: {message}")

    for key in data:
        if key not in TOP_LEVEL:
            report((key,), f"unknown key (expected one of: {', '.join(sorted(TOP_LEVEL))})")
    defaults = data.get("defaults") or {}
    hosts_data = data.get("hosts")
    if not isinstance(defaults, dict):
        report(("defaults",), "must be a mapping")
        defaults = {}
    if not isinstance(hosts_data, dict) or not hosts_data:
        report(("hosts",), "must be a non-empty mapping of host name -> settings")
        raise InventoryError(problems)

    # An empty value (`from:`, `backup:`, a bare `-` in a list) is a mistake, not a default:
    # one line each, and the key is left out so pydantic does not report it again.
    empty: set[tuple[Any, ...]] = set()
    defaults = _drop_empty(defaults, ("defaults",), empty)
    for path in sorted(empty, key=lambda p: lines.get(p, 0)):
        report(path, EMPTY_VALUE)

    hosts: dict[str, HostSpec] = {}
    for name, entry in hosts_data.items():
        if entry is None:
            report(("hosts", name), "has no settings: give at least its address: (admin_user "
                                    "and backup_key here or under defaults:)")
            continue
        if not isinstance(entry, dict):
            report(("hosts", name), "must be a mapping of settings")
            continue
        host_empty: set[tuple[Any, ...]] = set()
        entry = _drop_empty(entry, ("hosts", name), host_empty)
        for path in sorted(host_empty, key=lambda p: lines.get(p, 0)):
            report(path, EMPTY_VALUE)
        empty |= host_empty
        merged = _tuples(_merge(defaults, entry))
        merged["name"] = str(name)
        try:
            hosts[str(name)] = validate_host(merged)
        except ValidationError as exc:
            for error in exc.errors():
                loc = tuple("from" if p == "from_" else p for p in error["loc"])
                message = _message(error)
                field = next((f for f in _MODEL_FIELDS if message.startswith(f + ": ")),
                             None)
                if not loc and field:
                    # Host's own checks across fields: point at the field they name.
                    loc, message = tuple(field.split(".")), message[len(field) + 2:]
                # Point at the line the bad value came from: the host entry or defaults.
                host_path = ("hosts", name, *loc)
                default_path = ("defaults", *loc)
                if host_path in empty or default_path in empty:
                    continue  # reported above as an empty value
                if loc == ("name",):
                    path = ("hosts", name)
                elif host_path in lines or default_path not in lines:
                    path = host_path
                else:
                    path = default_path
                report(path, message)
    seen: list[HostSpec] = []
    for name, host in hosts.items():
        for other in seen:
            if destinations.dests_meet(host.destination, other.destination):
                report(("hosts", name, "backup", "destination"),
                       f"{host.destination} (host {name}) and {other.destination} (host "
                       f"{other.name}) share a folder (or one holds the other, or its "
                       ".pullback state): each host needs its own, e.g. with {name}")
                break
        seen.append(host)
    if problems:
        raise InventoryError(problems)
    return Inventory(path=Path(source), hosts=hosts)


# Host's model-level checks start their message with the field they are about.
_MODEL_FIELDS = ("backup.destination", "backup.options", "backup.extra_options")


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return "unknown key"
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind.endswith("_type"):
        message += f" (got {type(error['input']).__name__} {error['input']!r})"
    elif kind != "value_error":
        message += f" (got {error['input']!r})"
    return message


def load(path: str | Path) -> Inventory:
    path = Path(path)
    inventory = load_text(read_inventory(path).decode("utf-8"), str(path))
    return Inventory(path=path, hosts=inventory.hosts)
