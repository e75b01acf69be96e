"""The compiled inventory: the same hosts as the validator, used only while it is current
and private to this user."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from roles.core.hardened import Mode
from roles.core.spec import BackupSpec, HostSpec, MonitorSpec, RetainSpec, RsyncSpec
from roles.inventory import compiled, selection
from roles.inventory import schema as validator
from tests.unit.test_inventory import GOOD

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "pullback"


@pytest.fixture
def inventory(tmp_path) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text(GOOD)
    return path


def _fields(value):
    """Every field of a spec, nested specs and tuples item by item, each leaf with its type:
    equal only when two specs agree field for field and type for type (a ``Mode`` is not
    its word, a tuple not a list, ``True`` not ``1``, ``22`` not ``22.0``), which ``==``
    on the dataclasses does not tell apart."""
    if dataclasses.is_dataclass(value):
        return {f.name: _fields(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return type(value).__name__, [_fields(v) for v in value]
    return type(value).__name__, value


def _lab_inventories() -> dict[str, str]:
    from lab import hosts as lab

    state = lab.state_dir()
    hosts = [lab.LabHost(f"pullback-lab-{i}", 2200 + i, "ssh-ed25519 AAAA", "bookworm")
             for i in (1, 2)]
    return {f"lab {version}{' mirror' * bool(port)}":
            lab.render_inventory(hosts, port, state, version)
            for version in ("3.2.7", "2.6.9", "3.4.1") for port in (None, 8873)}


INVENTORIES = {"inventory.yaml": (ROOT / "inventory.yaml").read_text(), "GOOD": GOOD,
               **_lab_inventories()}


@pytest.mark.parametrize("name", INVENTORIES)
def test_the_cached_spec_equals_the_freshly_validated_one(cache, tmp_path, monkeypatch, name):
    """Every field of each cached host equals, in value and type, the ``validate_host`` of
    the same merged settings, called afresh."""
    path = tmp_path / "inventory.yaml"
    path.write_text(INVENTORIES[name])
    given: dict[str, dict] = {}

    def recording(data):
        given[data["name"]] = data
        return validate_host(data)

    validate_host = validator.validate_host
    monkeypatch.setattr(validator, "validate_host", recording)
    first = compiled.load(path).hosts  # a miss: validated (recorded), then cached
    monkeypatch.setattr(validator, "validate_host", validate_host)
    assert first and list(given) == list(first)

    def no_validator(*args, **kwargs):
        raise AssertionError("validated again")

    monkeypatch.setattr(validator, "load_text", no_validator)
    cached = compiled.load(path).hosts
    assert list(cached) == list(given)
    for host_name, data in given.items():
        fresh = validate_host(data)
        assert type(cached[host_name]) is HostSpec and cached[host_name] == fresh
        assert _fields(cached[host_name]) == _fields(fresh)


def _leaves(spec, path=()):
    """``(path, value)`` of every field that is not itself a spec."""
    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, (*path, field.name))
        else:
            yield (*path, field.name), value


def _replaced(spec, path, value):
    if len(path) == 1:
        return dataclasses.replace(spec, **{path[0]: value})
    inner = getattr(spec, path[0])
    return dataclasses.replace(spec, **{path[0]: _replaced(inner, path[1:], value)})


def _others(value):
    """Another value of the field's type, and (where ``==`` cannot tell) the same value as
    another type."""
    if isinstance(value, Mode):  # the spec turns a plain word back into its Mode
        return [next(m for m in Mode if m != value)]
    if isinstance(value, bool):
        return [not value, int(value)]
    if isinstance(value, int | float):
        return [value + 1, float(value) if isinstance(value, int) else int(value)]
    if isinstance(value, str):
        return [value + "x"]
    if isinstance(value, tuple):
        return [(*value, "x"), list(value)]
    assert value is None, f"a field of type {type(value).__name__}: extend _others"
    return ["x", 0]


def test_the_comparison_fails_when_any_spec_field_differs(cache, inventory):
    """The check above can fail: one field changed, anywhere in the spec, in value or only
    in type, makes the two differ."""
    spec = compiled.load(inventory).hosts["db1"]
    leaves = list(_leaves(spec))
    assert len(leaves) == sum(1 for _ in _leaves(validator.load(inventory).hosts["db1"]))
    assert {p[0] for p, _ in leaves} >= {"name", "rsync", "backup", "monitor"}
    assert ("backup", "retain", "daily") in dict(leaves)
    for path, value in leaves:
        for other in _others(value):
            changed = _replaced(spec, path, other)
            assert _fields(changed) != _fields(spec), (path, other)


def test_the_computed_values_are_the_specs_alone(inventory):
    """``destination``, ``backup_pubkey``, the rsync paths and ``pull_exclude`` are defined
    on the spec; the validator's models keep no second copy."""
    db1 = validator.load(inventory).hosts["db1"]
    assert db1.destination == "/srv/backups/db1" and db1.backup_pubkey == "/keys/backup.pub"
    assert db1.rsync.remote_binary == "/opt/rsync/bin/rsync" and db1.rsync.local_binary == \
        "/usr/local/bin/rsync"
    assert db1.rsync.urls == [db1.rsync.url]
    assert db1.backup.pull_exclude[-1] == "/var/lib/mysql/*"
    assert db1.backup.exclude == ("/var/lib/mysql/*",) and db1.from_ == \
        "198.51.100.7,2001:db8::/32"
    for spec, model in ((HostSpec, validator.Host), (RsyncSpec, validator.RsyncSettings),
                        (BackupSpec, validator.BackupSettings),
                        (RetainSpec, validator.RetainSettings),
                        (MonitorSpec, validator.MonitorSettings)):
        computed = {n for n, v in vars(spec).items() if isinstance(v, property)}
        assert not computed & set(dir(model)), (model.__name__, computed & set(dir(model)))
    assert {n for n, v in vars(HostSpec).items() if isinstance(v, property)} == {
        "destination", "backup_pubkey"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        db1.port = 22  # type: ignore[misc]
    with pytest.raises(AttributeError):
        _ = db1.no_such_field  # type: ignore[attr-defined]


@pytest.mark.parametrize("change", [
    {"unknown": 1}, {"forced_command": "shell"}, {"backup": {"source": "/"}}])
def test_a_cache_entry_of_another_shape_is_a_miss(cache, inventory, change):
    """An entry that does not rebuild a HostSpec (a field missing, unknown or of another
    shape) is read as no entry: validated again, never half-used."""
    compiled.load(inventory)
    (entry,) = cache.glob("inventory-*.json")
    data = json.loads(entry.read_text())
    data["hosts"]["db1"].update(change)
    entry.write_text(json.dumps(data))
    key = compiled.cache_key(inventory.read_bytes())
    assert compiled.read_cache(inventory, key) is None
    data["hosts"]["db1"] = json.loads(entry.read_text())["hosts"]["web1"]  # a good shape
    entry.write_text(json.dumps(data))
    assert compiled.read_cache(inventory, key)["db1"].name == "web1"


def test_the_second_load_comes_from_the_cache(cache, inventory, monkeypatch):
    first = compiled.load(inventory)
    (entry,) = cache.glob("inventory-*.json")
    assert oct(entry.stat().st_mode & 0o777) == "0o600" and oct(cache.stat().st_mode & 0o777) \
        == "0o700"

    def no_validator(*args, **kwargs):
        raise AssertionError("validated again")

    monkeypatch.setattr(validator, "load_text", no_validator)
    assert compiled.load(inventory) == first


def test_an_edited_inventory_is_validated_again(cache, inventory):
    compiled.load(inventory)
    inventory.write_text(GOOD.replace("port: 2222", "port: 2223"))
    assert compiled.load(inventory).hosts["db1"].port == 2223
    inventory.write_text(GOOD.replace("port: 2222", "port: 70000"))
    with pytest.raises(selection.InventoryError, match=r"inventory.yaml:\d+: hosts.db1.port: "):
        compiled.load(inventory)


@pytest.mark.parametrize("change", ["home", "tampered", "group-writable", "dir-open",
                                    "garbage", "symlink"])
def test_a_cache_entry_is_ignored_unless_current_and_private(cache, inventory, monkeypatch,
                                                             tmp_path, change):
    compiled.load(inventory)
    (entry,) = cache.glob("inventory-*.json")
    if change == "home":  # ~ expands against $HOME: another HOME is another result
        monkeypatch.setenv("HOME", str(tmp_path))
    elif change == "tampered":  # an entry for another inventory text
        data = json.loads(entry.read_text())
        data["hosts"]["db1"]["port"] = 1
        data["key"] = "0" * 64
        entry.write_text(json.dumps(data))
    elif change == "group-writable":
        data = json.loads(entry.read_text())
        data["hosts"]["db1"]["port"] = 1
        entry.write_text(json.dumps(data))
        entry.chmod(0o620)
    elif change == "dir-open":
        data = json.loads(entry.read_text())
        data["hosts"]["db1"]["port"] = 1
        entry.write_text(json.dumps(data))
        cache.chmod(0o777)
    elif change == "garbage":
        entry.write_text("{not json")
    elif change == "symlink":
        fake = tmp_path / "fake.json"
        data = json.loads(entry.read_text())
        data["hosts"]["db1"]["port"] = 1
        fake.write_text(json.dumps(data))
        fake.chmod(0o600)
        entry.unlink()
        entry.symlink_to(fake)
    key = compiled.cache_key(inventory.read_bytes())
    assert compiled.read_cache(inventory, key) is None
    assert compiled.load(inventory).hosts["db1"].port == 2222


def test_the_entry_names_its_key_and_inventory(cache, inventory):
    compiled.load(inventory)
    (entry,) = cache.glob("inventory-*.json")
    data = json.loads(entry.read_text())
    assert data["key"] == compiled.cache_key(inventory.read_bytes())
    assert data["inventory"] == os.path.realpath(inventory)


def test_an_unwritable_cache_only_costs_the_speed_up(tmp_path, inventory, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file: the folder cannot exist
    assert compiled.load(inventory).hosts["web1"].address == "web1.example.com"


def test_unreadable_and_bad_inventories_are_one_line_errors(cache, tmp_path):
    with pytest.raises(selection.InventoryError, match=r"missing.yaml: inventory file not found"):
        compiled.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"hosts: {a: {address: \xff}}")
    with pytest.raises(selection.InventoryError, match=r"bad.yaml:1: not UTF-8: byte 0xff at column 22"):
        compiled.load(bad)
    assert not list(cache.glob("inventory-*.json"))


def test_old_entries_are_pruned_when_one_is_written(cache, inventory, tmp_path):
    cache.mkdir(parents=True, mode=0o700)
    old = cache / "inventory-0123.json"
    old.write_text("{}")
    os.utime(old, (1, 1))
    compiled.load(inventory)
    assert not old.exists() and len(list(cache.glob("inventory-*.json"))) == 1


def test_choose_reports_unknown_hosts_and_empty_shards_in_one_line(cache, inventory):
    inv = compiled.load(inventory)
    assert [h.name for h in inv.choose(["db1"], None)] == ["db1"]
    with pytest.raises(selection.InventoryError, match=r"unknown host x \(known: web1, db1\)"):
        inv.choose(["x"], None)
    with pytest.raises(selection.InventoryError, match="expected K/N"):
        inv.choose([], "3/2")
    empty = next(f"{k}/50" for k in range(1, 51) if not inv.select(None, (k, 50)))
    with pytest.raises(selection.InventoryError, match=f"no host of .* is in shard {empty}"):
        inv.choose([], empty)


def test_the_unattended_runner_imports_neither_invoke_nor_the_validator(cache, inventory):
    """What a scheduled run loads once the inventory is compiled."""
    compiled.load(inventory)
    probe = ("import sys, roles.cli.unattended as u, roles.inventory.compiled as c; "
             f"c.load({str(inventory)!r}); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('invoke', 'fabric', 'paramiko', 'pydantic', 'yaml', 'jinja2', 'rich') "
             "or m == 'roles.inventory.schema'))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                            text=True, check=True, env={**os.environ})
    assert result.stdout.strip() == "[]"


def test_pullback_backup_rejects_bad_input_with_exit_2_and_one_line(cache, inventory, tmp_path,
                                                                   capsys):
    from roles.cli import unattended

    cases = [
        (["--inventory", str(tmp_path / "missing.yaml")],
         f"{tmp_path}/missing.yaml: inventory file not found"),
        (["--inventory", str(inventory), "--host", "nope"],
         f"{inventory}: unknown host nope (known: web1, db1)"),
        (["--inventory", str(inventory), "--shard", "0/2"],
         "--shard '0/2': expected K/N with 1 <= K <= N <= 1000, e.g. 2/3"),
    ]
    for argv, line in cases:
        assert unattended.main(argv) == 2
        captured = capsys.readouterr()
        assert (captured.out, captured.err) == ("", line + "\n")


def test_pullback_backup_is_installed_beside_invoke():
    program = Path(sys.executable).parent / "pullback-backup"
    result = subprocess.run([str(program), "--help"], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0 and "--inventory" in result.stdout and "--shard" in \
        result.stdout and "--dry-run" in result.stdout


@pytest.mark.parametrize("layout", ["symlinked-folder", "open-parent"])
def test_no_cache_in_a_folder_someone_else_controls(tmp_path, inventory, monkeypatch, layout):
    """Root running under sudo with a user's HOME must neither trust nor write there."""
    base = tmp_path / "cache"
    if layout == "symlinked-folder":  # ~/.cache/pullback -> a private folder elsewhere
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        base.mkdir()
        (base / "pullback").symlink_to(elsewhere)
        watched = elsewhere
    else:  # a parent others can write could swap the folder for their own
        base.mkdir()
        base.chmod(0o777)
        watched = base / "pullback"
    monkeypatch.setenv("XDG_CACHE_HOME", str(base))
    assert compiled.load(inventory).hosts["db1"].port == 2222
    assert not list(watched.glob("inventory-*.json"))  # nothing written
    key = compiled.cache_key(inventory.read_bytes())
    hosts = {name: h.to_dict() for name, h in validator.load(inventory).hosts.items()}
    hosts["db1"]["port"] = 1  # an entry planted there, current key, private file
    entry = compiled.cache_file(inventory)
    entry.parent.mkdir(mode=0o700, exist_ok=True)
    entry.write_text(json.dumps({"key": key, "hosts": hosts}))
    entry.chmod(0o600)
    assert compiled.read_cache(inventory, key) is None
    assert compiled.load(inventory).hosts["db1"].port == 2222


def test_without_the_validators_source_there_is_no_cache(cache, inventory, monkeypatch,
                                                         tmp_path):
    """A sourceless install cannot tell a stale entry from a current one: no cache."""
    monkeypatch.setattr(compiled, "_SOURCES", (tmp_path / "missing.py",))
    assert compiled.load(inventory).hosts["db1"].port == 2222
    assert not list(cache.glob("inventory-*.json"))


def test_a_systemd_instance_names_a_shard_without_own_units_or_one_host(cache, tmp_path,
                                                                        capsys):
    """``pullback-backup --unit %i`` (pullback-backup@.service): ``K-N`` is the shard
    without the hosts that have their own unit; a host name is that host alone."""
    path = tmp_path / "inventory.yaml"
    path.write_text(GOOD.replace("port: 2222", "port: 2222\n    backup: {own_unit: true}")
                    .replace("    backup: {exclude: [/var/lib/mysql/*], destination: "
                             "\"/srv/backups/{name}\"}\n", ""))
    inv = compiled.load(path)
    assert inv.hosts["db1"].backup.own_unit and not inv.hosts["web1"].backup.own_unit
    assert [h.name for h in inv.choose_unit("1-1")] == ["web1"]
    assert [h.name for h in inv.choose_unit("db1")] == ["db1"]
    with pytest.raises(selection.InventoryError, match="expected K/N"):
        inv.choose_unit("0-2")
    lone = next(f"{k}-9" for k in range(1, 10) if not inv.select(None, (k, 9)))
    with pytest.raises(selection.InventoryError, match="without a unit of its own"):
        inv.choose_unit(lone)
    from roles.cli import unattended

    assert unattended.main(["--inventory", str(path), "--unit", "nope"]) == 2
    assert capsys.readouterr().err == f"{path}: unknown host nope (known: web1, db1)\n"
    assert unattended.main(["--inventory", str(path), "--unit", "1-1", "--shard", "1/1"]) == 2
    assert "--unit takes neither" in capsys.readouterr().err
