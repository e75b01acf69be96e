"""Inventory loading: defaults merging, and one exact line per problem."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from roles.inventory.schema import (
    DEFAULT_OPTIONS,
    DEFAULT_SNAPSHOTS,
    InventoryError,
    load,
    load_text,
)

ROOT = Path(__file__).resolve().parents[2]

GOOD = textwrap.dedent("""\
    defaults:
      admin_user: remoteuser
      backup_key: /keys/backup
      known_hosts: /keys/known_hosts
      rsync: {version: 2.6.9, prefix: /opt/rsync}
      backup: {snapshots: 3, exclude: [/proc/*]}
    hosts:
      web1:
        address: web1.example.com
      db1:
        address: 192.0.2.10
        port: 2222
        from: "198.51.100.7,2001:db8::/32"
        rsync: {version: 3.2.7}
        backup: {exclude: [/var/lib/mysql/*], destination: "/srv/backups/{name}"}
""")


def test_defaults_merge_under_each_host():
    inventory = load_text(GOOD)
    web1, db1 = inventory.hosts["web1"], inventory.hosts["db1"]
    assert web1.admin_user == db1.admin_user == "remoteuser"
    assert web1.port == 22 and db1.port == 2222
    # nested mappings merge key by key: db1 keeps the default prefix, overrides the version
    assert (web1.rsync.version, web1.rsync.prefix) == ("2.6.9", "/opt/rsync")
    assert (db1.rsync.version, db1.rsync.prefix) == ("3.2.7", "/opt/rsync")
    # lists are replaced, not joined
    assert web1.backup.exclude == ("/proc/*",)
    assert db1.backup.exclude == ("/var/lib/mysql/*",)
    assert db1.backup.snapshots == 3
    assert db1.destination == "/srv/backups/db1"
    assert web1.destination == "/var/backups/pullback/web1"
    assert db1.from_ == "198.51.100.7,2001:db8::/32"
    # web1 pins 2.6.9 (no -A/-X there), db1 3.2.7: each gets its release's defaults.
    assert web1.backup.options == ("-avzx", "-HS", "--numeric-ids", "--delete", "--progress")
    assert db1.backup.options == DEFAULT_OPTIONS
    assert web1.rsync.remote_binary == "/opt/rsync/bin/rsync"


def test_the_shipped_example_mirrors_the_seed():
    host = load(ROOT / "inventory.yaml").hosts["example.com"]
    assert host.address == "example.com"
    assert host.admin_user == "remoteuser"
    assert host.rsync.version == "3.5.1" and host.rsync.allow_vulnerable is False
    # The release's defaults: the seed's options would lose hard links, ACLs, xattrs, holes.
    assert host.backup.options == DEFAULT_OPTIONS == (
        "-avzx", "-HAXS", "--numeric-ids", "--delete", "--progress")
    assert host.backup.snapshots == 7  # history by default, not the seed's one mirror
    assert host.from_ is None  # from= this backup host's address, as the server sees it


def test_the_shipped_example_is_for_linux_with_macos_in_a_comment():
    text = (ROOT / "inventory.yaml").read_text()
    host = load_text(text).hosts["example.com"]
    assert host.backup_key == "/root/.ssh/id_ed25519_pullback"
    assert host.destination == "/var/backups/pullback/example.com"
    assert host.backup.allow_destination is None  # a standard root: nothing to allow
    assert host.backup.pull_exclude[:2] == ("/proc/*", "/sys/*")
    live = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any("/var/root" in line for line in live)
    # The comment's macOS lines, put in place, load too.
    mac = (text.replace("  backup_key: /root/.ssh/id_ed25519_pullback ",
                        "  backup_key: /var/root/.ssh/id_ed25519_rsync ")
           .replace("    destination: /var/backups/pullback/{name} ",
                    "    destination: /var/root/backups/{name}\n"
                    "    allow_destination: /var/root/backups "))
    host = load_text(mac).hosts["example.com"]
    assert (host.backup_key, host.destination) == ("/var/root/.ssh/id_ed25519_rsync",
                                                   "/var/root/backups/example.com")
    assert "#   backup_key: /var/root/.ssh/id_ed25519_rsync\n" in text
    assert "#     allow_destination: /var/root/backups" in text


def test_defaults_keep_history_and_from_any_is_accepted():
    inventory = load_text("hosts:\n  a:\n    address: 192.0.2.1\n    admin_user: u\n"
                          "    backup_key: /k\n  b:\n    address: 192.0.2.2\n"
                          "    admin_user: u\n    backup_key: /k\n    from: any\n"
                          "    backup: {snapshots: 0}\n")
    a, b = inventory.hosts["a"], inventory.hosts["b"]
    assert a.backup.snapshots == DEFAULT_SNAPSHOTS == 7 and b.backup.snapshots == 0
    assert a.from_ is None and b.from_ == "any"


def test_the_shipped_example_shows_the_seeds_2_6_9_behind_the_switch():
    """Uncommenting the example's two lines gives the seed's 2.6.9, knowingly allowed."""
    text = (ROOT / "inventory.yaml").read_text()
    assert "    # version: 2.6.9\n    # allow_vulnerable: true\n" in text
    text = (text.replace("    version: 3.5.1 ", "    # version: 3.5.1 ")
            .replace("    allow_vulnerable: false\n", "")
            .replace("    # version: 2.6.9\n", "    version: 2.6.9\n")
            .replace("    # allow_vulnerable: true\n", "    allow_vulnerable: true\n"))
    host = load_text(text).hosts["example.com"]
    assert (host.rsync.version, host.rsync.allow_vulnerable) == ("2.6.9", True)


def test_rsync_defaults_to_the_newest_pin_and_refuses_nothing_silently():
    from roles.core.rsync import DEFAULT_VERSION, release_key
    from roles.features.rsync_build import KNOWN_SHA256

    host = load_text(BASE).hosts["a"]
    assert host.rsync.version == DEFAULT_VERSION == max(KNOWN_SHA256, key=release_key)
    assert host.rsync.allow_vulnerable is False
    assert load_text(BASE + "    rsync: {allow_vulnerable: true}\n").hosts["a"].rsync \
        .allow_vulnerable is True


@pytest.mark.parametrize("address", ["fe80::1%eth0", "fe80::1%2", "fe80::1%enp0s31f6",
                                     "fe80::1%br-lan.10", "2001:db8::7", "192.0.2.1"])
def test_addresses_with_a_plain_scope_id_pass(address):
    assert load_text(BASE.replace("a.example", f"'{address}'")).hosts["a"].address == address


def test_select_hosts():
    inventory = load_text(GOOD)
    assert [h.name for h in inventory.select(None)] == ["web1", "db1"]
    assert [h.name for h in inventory.select(["db1"])] == ["db1"]
    with pytest.raises(InventoryError, match="unknown host nope"):
        inventory.select(["nope"])


BASE = "hosts:\n  a:\n    address: a.example\n    admin_user: u\n    backup_key: /k\n"

BAD = [
    # (inventory text, the exact one-line message)
    ("hosts: [", "inventory.yaml:1: not valid YAML: expected the node content, but found '<stream end>'"),
    ("- a\n- b\n", "inventory.yaml:1: the inventory must be a mapping with 'hosts:'"),
    ("defaults: {}\n", "inventory.yaml:1: hosts: must be a non-empty mapping of host name -> settings"),
    (BASE + "servers: {}\n", "inventory.yaml:6: servers: unknown key (expected one of: defaults, hosts)"),
    (BASE + "    colour: red\n", "inventory.yaml:6: hosts.a.colour: unknown key"),
    ("hosts:\n  a:\n    address: a.example\n    backup_key: /k\n",
     "inventory.yaml:2: hosts.a.admin_user: required field is missing"),
    (BASE + "    port: 70000\n",
     "inventory.yaml:6: hosts.a.port: Input should be less than or equal to 65535 (got 70000)"),
    (BASE + "    port: '22'\n",
     "inventory.yaml:6: hosts.a.port: Input should be a valid integer (got str '22')"),
    (BASE.replace("a.example", "-oProxyCommand=sh"),
     "inventory.yaml:3: hosts.a.address: '-oProxyCommand=sh' is not a host name or IP address "
     "(letters, digits, '.', '-'; must not start with '-')"),
    (BASE.replace("a.example", "'a.example; rm -rf /'"),
     "inventory.yaml:3: hosts.a.address: 'a.example; rm -rf /' is not a host name or IP address "
     "(letters, digits, '.', '-'; must not start with '-')"),
    (BASE.replace("a.example", "'fe80::1%eth0 -oProxyCommand=sh'"),
     "inventory.yaml:3: hosts.a.address: 'fe80::1%eth0 -oProxyCommand=sh': the IPv6 scope id "
     "'eth0 -oProxyCommand=sh' is not an interface name (letters, digits, '.', '_', '-')"),
    (BASE.replace("a.example", "'fe80::1%$(id)'"),
     "inventory.yaml:3: hosts.a.address: 'fe80::1%$(id)': the IPv6 scope id '$(id)' is not an "
     "interface name (letters, digits, '.', '_', '-')"),
    (BASE.replace("a.example", "'fe80::1%eth0;id'"),
     "inventory.yaml:3: hosts.a.address: 'fe80::1%eth0;id': the IPv6 scope id 'eth0;id' is not "
     "an interface name (letters, digits, '.', '_', '-')"),
    (BASE.replace("a.example", "'fe80::1%`id`'"),
     "inventory.yaml:3: hosts.a.address: 'fe80::1%`id`': the IPv6 scope id '`id`' is not an "
     "interface name (letters, digits, '.', '_', '-')"),
    (BASE + "    rsync: {allow_vulnerable: 'yes'}\n",
     "inventory.yaml:6: hosts.a.rsync.allow_vulnerable: Input should be a valid boolean "
     "(got str 'yes')"),
    (BASE.replace("  a:", "  '-a':"),
     "inventory.yaml:2: hosts.-a: '-a' is not a valid host name (letters, digits, '.', '_', "
     "'-'; must not start with '-')"),
    (BASE.replace("admin_user: u", "admin_user: 'root -oX'"),
     "inventory.yaml:4: hosts.a.admin_user: 'root -oX' is not a valid user name"),
    (BASE.replace("admin_user: u", "admin_user: root"),
     "inventory.yaml:4: hosts.a.admin_user: root cannot be the admin: once setup-remote sets "
     "PermitRootLogin forced-commands-only, root logs in only to run the backup key's "
     "command; use a user with sudo"),
    (BASE.replace("/k", "keys/backup"),
     "inventory.yaml:5: hosts.a.backup_key: must be an absolute path (or start with ~/), "
     "got 'keys/backup'"),
    (BASE + "    backup: {destination: /}\n",
     "inventory.yaml:6: hosts.a.backup.destination: / is a system folder; a backup there would "
     "change it (mode 0700, --delete)"),
    (BASE + "    backup: {destination: /etc/}\n",
     "inventory.yaml:6: hosts.a.backup.destination: /etc/ is a system folder; a backup there "
     "would change it (mode 0700, --delete)"),
    (BASE + "    backup: {destination: '/srv/{host}'}\n",
     "inventory.yaml:6: hosts.a.backup.destination: may only use the placeholder {name}"),
    (BASE + "    rsync: {version: 3.2}\n",
     "inventory.yaml:6: hosts.a.rsync.version: Input should be a valid string (got float 3.2)"),
    (BASE + "    rsync: {version: latest}\n",
     "inventory.yaml:6: hosts.a.rsync.version: 'latest' is not an rsync version like 3.2.7 or 2.6.9"),
    (BASE + "    rsync: {sha256: abc}\n",
     "inventory.yaml:6: hosts.a.rsync.sha256: must be 64 lowercase hex digits (a SHA-256)"),
    (BASE + "    rsync: {url: 'https://example.org/rsync.tar.gz'}\n",
     "inventory.yaml:6: hosts.a.rsync.url: 'https://example.org/rsync.tar.gz' must contain "
     "'{version}'"),
    (BASE + "    forced_command: shell\n",
     "inventory.yaml:6: hosts.a.forced_command: Input should be 'captured' or 'daemon' "
     "(got 'shell')"),
    (BASE + "    backup: {options: [-avzxn]}\n",
     "inventory.yaml:6: hosts.a.backup.options[0]: '-avzxn' contains -n: use `invoke backup "
     "--dry-run` instead"),
    (BASE + "    backup: {options: ['--rsh=ssh -p 2']}\n",
     "inventory.yaml:6: hosts.a.backup.options[0]: '--rsh=ssh -p 2' is not allowed here: the ssh "
     "command is built from the inventory"),
    (BASE + "    from: '1.2.3.4\" ,command=\"sh'\n",
     "inventory.yaml:6: hosts.a.from: '1.2.3.4\" ,command=\"sh' is not a from= pattern list "
     "(addresses, host names, * ? ! / ,)"),
    (BASE + "    backup: {module: 'sys tem'}\n",
     "inventory.yaml:6: hosts.a.backup.module: 'sys tem' is not a module name (letters, digits, "
     "'_', '-')"),
    (BASE + "    backup: {exclude: [\"a\\nb\"]}\n",
     "inventory.yaml:6: hosts.a.backup.exclude: must not contain control characters or newlines"),
    ("defaults:\n  port: 0\n" + BASE,
     "inventory.yaml:2: defaults.port: Input should be greater than or equal to 1 (got 0)"),
    (BASE + "    port: 22\n    port: 23\n", "inventory.yaml:7: duplicate key 'port'"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m.split(": ", 2)[1] for _, m in BAD])
def test_malformed_inventory_gives_one_exact_line(text: str, message: str):
    with pytest.raises(InventoryError) as caught:
        load_text(text)
    assert caught.value.problems == [message]


def test_every_problem_is_reported_at_once():
    text = BASE + "    port: 0\n    forced_command: x\n"
    with pytest.raises(InventoryError) as caught:
        load_text(text)
    assert [p.split(": ")[1] for p in caught.value.problems] == [
        "hosts.a.port", "hosts.a.forced_command"]


def test_missing_file(tmp_path):
    with pytest.raises(InventoryError, match="inventory file not found"):
        load(tmp_path / "nope.yaml")


# --- backup.options per rsync release ---------------------------------------------------------


@pytest.mark.parametrize(("version", "expected"), [
    ("3.2.7", ("-avzx", "-HAXS", "--numeric-ids", "--delete", "--progress")),
    ("3.0.0", ("-avzx", "-HAXS", "--numeric-ids", "--delete", "--progress")),
    ("3.4.0pre1", ("-avzx", "-HAXS", "--numeric-ids", "--delete", "--progress")),
    ("2.6.9", ("-avzx", "-HS", "--numeric-ids", "--delete", "--progress")),
])
def test_default_options_follow_the_pinned_rsync(version, expected):
    host = load_text(BASE + f"    rsync: {{version: '{version}'}}\n").hosts["a"]
    assert host.backup.options == expected


def test_explicit_options_are_kept_as_given_when_they_keep_the_copy_exact():
    host = load_text(BASE + "    rsync: {version: 2.6.9}\n"
                            "    backup: {options: [-aHSx, --numeric-ids, --del]}\n").hosts["a"]
    assert host.backup.options == ("-aHSx", "--numeric-ids", "--del")
    spelled_out = ["-rlptgoD", "--one-file-system", "--numeric-ids", "--delete-after",
                   "--hard-links", "--acls", "--xattrs", "--sparse"]
    host = load_text(BASE + f"    backup: {{options: {spelled_out}}}\n").hosts["a"]
    assert host.backup.options == tuple(spelled_out)
    # allow_inexact: taken as given, as before extra_options existed.
    host = load_text(BASE + "    backup: {options: [-a], allow_inexact: true}\n").hosts["a"]
    assert host.backup.options == ("-a",)


@pytest.mark.parametrize(("options", "message"), [
    ("[-aHAXx]", "--acls (-A, ACLs) needs rsync 3.0 or later on both ends"),
    ("[-ax, --xattrs]", "--xattrs (-X, xattrs) needs rsync 3.0 or later on both ends"),
    ("[-aSx, --inplace]", "--sparse (-S) with --inplace is refused by rsync before 3.1.3"),
])
def test_options_the_pinned_269_cannot_run_are_one_line(options, message):
    with pytest.raises(InventoryError) as exc:
        load_text(BASE + "    rsync: {version: 2.6.9}\n"
                         f"    backup: {{options: {options}}}\n")
    (line,) = exc.value.problems
    assert line.startswith("inventory.yaml:7: hosts.a.backup.options: " + message), line


def test_sparse_with_inplace_is_fine_from_313():
    host = load_text(BASE + "    rsync: {version: 3.1.3}\n"
                            "    backup: {extra_options: [--inplace]}\n").hosts["a"]
    assert host.backup.options == (*DEFAULT_OPTIONS, "--inplace")
    with pytest.raises(InventoryError, match="--sparse .-S. with --inplace is refused"):
        load_text(BASE + "    rsync: {version: 3.1.2}\n"
                         "    backup: {extra_options: [--inplace]}\n")


# --- known_hosts ----------------------------------------------------------------------------

MINIMAL = "hosts:\n  a: {address: 192.0.2.1, admin_user: admin, backup_key: /keys/backup}\n"


def test_the_default_known_hosts_is_in_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    host = load_text(MINIMAL).hosts["a"]
    assert host.known_hosts == f"{tmp_path}/.ssh/known_hosts"


def test_a_known_hosts_with_a_tilde_is_in_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    text = MINIMAL.replace("/keys/backup}", "/keys/backup, known_hosts: ~/pb/known}")
    assert load_text(text).hosts["a"].known_hosts == f"{tmp_path}/pb/known"


# --- backup.options: what a backup never runs --------------------------------------------------


@pytest.mark.parametrize(("option", "why"), [
    ("-n", "contains -n: use `invoke backup --dry-run` instead"),
    ("--dry-run", "use `invoke backup --dry-run` instead"),
    ("-avn", "contains -n"),
    ("-0n", "contains -n"),  # a digit in the cluster hid the n from the old check
    ("-4avzn", "contains -n"),
    ("--list-only", "a listing is not a backup"),
    ("-e", "the ssh command is built from the inventory"),
    ("-essh", "contains -e"),
    ("-avessh", "contains -e"),
    ("-0e.iLs", "contains -e"),
    ("-e=ssh", "contains -e"),
    ("--rsh", "the ssh command is built from the inventory"),
    ("--rsh=ssh -i /k", "the ssh command is built from the inventory"),
    ("-M--log-file=/etc/cron.d/x", "contains -M"),
    ("-avM--remove-source-files", "contains -M"),
    ("--remote-option=--remove-source-files", "would run there as root"),
    ("--remote-option", "would run there as root"),
    ("--remove-source-files", "a backup never deletes on the server"),
    ("--remove-sent-files", "a backup never deletes on the server"),
    ("--remove-anything-new", "a backup never deletes on the server"),
    ("--log-file=/tmp/x", "pullback logs every run"),
    ("--log-file-format=%i", "pullback logs every run"),
    ("--log-file-anything", "pullback logs every run"),
    ("--trust-sender", "compromised server"),
    ("--only-write-batch=/tmp/b", "a batch is not a pull"),
    ("--read-batch=/tmp/b", "a batch is not a pull"),
    ("--rsync-path=/tmp/evil", "rsync.prefix"),
    ("--server", "internal rsync option"),
    ("--daemon", "internal rsync option"),
    ("-", "is not an option"),
    ("ssh", "is not an option"),
])
def test_backup_options_that_are_refused(option, why):
    text = BASE + f"    backup: {{options: [-a, {option!r}]}}\n"
    with pytest.raises(InventoryError) as caught:
        load_text(text)
    (problem,) = caught.value.problems
    assert problem.startswith("inventory.yaml:6: hosts.a.backup.options[1]: ")
    assert why in problem and "\n" not in problem


@pytest.mark.parametrize("options", [
    [],
    ["--stats", "--exclude=/proc/*"],
    ["-avvzxub", "--numeric-ids", "--max-delete=5", "--info=progress2"],
    ["-avzx", "-B1024n"],  # after -B the word is its argument: no dry run
    ["-avzx", "-T/var/tmp/pullback"],  # --temp-dir: local
    ["-avzx", "-0", "-4", "-8h"],
    ["-avzx", "--delete-after", "--delete-excluded"],
    ["-a", "--numeric-ids", "--checksum-choice=xxh128", "--compress-level=3", "--open-noatime"],
])
def test_backup_options_that_pass(options):
    text = BASE + f"    backup: {{extra_options: {options!r}}}\n"
    assert load_text(text).hosts["a"].backup.options == (*DEFAULT_OPTIONS, *options)
    text = BASE + f"    backup: {{options: {[*DEFAULT_OPTIONS, *options]!r}}}\n"
    assert load_text(text).hosts["a"].backup.options == (*DEFAULT_OPTIONS, *options)


def test_a_refused_option_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(BASE + "    backup: {options: [-a, '-M--log-file=/etc/x']}\n")
    result = subprocess.run([str(Path(sys.executable).parent / "invoke"), "status",
                             "--inventory", str(inventory)], cwd=ROOT, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 2, result
    assert result.stderr.strip().count("\n") == 0
    assert "hosts.a.backup.options[1]: '-M--log-file=/etc/x' contains -M" in result.stderr


# --- backup.options keep the copy exact; extra_options and bwlimit add -----------------------


def test_options_that_drop_what_makes_the_copy_exact_are_refused_at_their_line():
    """The issue's case: `options: [--bwlimit=1000]` ran with no -a, -x, --numeric-ids or
    --delete. Now one line, at the options' line, naming what is missing and the way out."""
    with pytest.raises(InventoryError) as caught:
        load_text(BASE + "    backup:\n      options: [--bwlimit=1000]\n")
    assert caught.value.problems == [
        "inventory.yaml:7: hosts.a.backup.options: replaces the defaults and leaves out -a -x "
        "--numeric-ids --delete -H -S -A -X, which a full-system copy needs: put additions in "
        "backup.extra_options (the defaults stay), or list those too, or set "
        "backup.allow_inexact: true knowingly"]


@pytest.mark.parametrize(("version", "options", "missing"), [
    ("3.5.1", ["-avzHx", "--numeric-ids", "--delete", "--progress"], "-S -A -X"),
    ("2.6.9", ["-avzHx", "--numeric-ids", "--delete", "--progress"], "-S"),  # no -A/-X there
    ("3.5.1", ["-rlptgo", "-xHAXS", "--numeric-ids", "--delete"], "-D"),
    ("3.5.1", ["-avzxHAXS", "--delete"], "--numeric-ids"),
    ("3.5.1", ["-avzxHAXS", "--numeric-ids", "--max-delete=5"], "--delete"),
    ("3.5.1", ["-avzHAXS", "--numeric-ids", "--delete"], "-x"),
])
def test_what_each_release_needs_for_an_exact_copy(version, options, missing):
    with pytest.raises(InventoryError) as caught:
        load_text(BASE + f"    rsync: {{version: '{version}'}}\n"
                         f"    backup: {{options: {options}}}\n")
    (line,) = caught.value.problems
    assert f"leaves out {missing}, which" in line, line


def test_extra_options_and_bwlimit_add_to_the_defaults():
    host = load_text(BASE + "    backup:\n      extra_options: [--checksum, '--filter=- *.tmp']\n"
                            "      bwlimit: 1000\n").hosts["a"]
    assert host.backup.options == (*DEFAULT_OPTIONS, "--checksum", "--filter=- *.tmp",
                                   "--bwlimit=1000")
    host = load_text(BASE + "    rsync: {version: 2.6.9}\n"
                            "    backup: {bwlimit: 50}\n").hosts["a"]
    assert host.backup.options == ("-avzx", "-HS", "--numeric-ids", "--delete", "--progress",
                                   "--bwlimit=50")


@pytest.mark.parametrize(("extra", "message"), [
    ("--no-perms", "backup.extra_options: turns off -p, which a full-system copy needs"),
    ("--no-D", "backup.extra_options: turns off -D, which"),
    ("--no-x", "backup.extra_options: turns off -x, which"),
    ("--no-one-file-system", "backup.extra_options: turns off -x, which"),
    ("--no-A", "backup.extra_options: turns off -A, which"),
    ("--no-numeric-ids", "backup.extra_options: turns off --numeric-ids, which"),
    ("-L", "backup.extra_options: -L holds -L, which copies what symlinks point to instead"),
    ("--safe-links", "backup.extra_options: --safe-links leaves out symlinks that point "
                     "outside the tree: the copy would differ from the server"),
    ("--chown=0:0", "backup.extra_options: --chown=0:0 changes the copies' owners"),
])
def test_extra_options_that_undo_the_exact_copy_are_refused(extra, message):
    with pytest.raises(InventoryError) as caught:
        load_text(BASE + f"    backup: {{extra_options: ['{extra}']}}\n")
    (line,) = caught.value.problems
    assert line.startswith(f"inventory.yaml:6: hosts.a.{message}"), line
    host = load_text(BASE + f"    backup: {{extra_options: ['{extra}'], allow_inexact: true}}\n"
                     ).hosts["a"]
    assert host.backup.options == (*DEFAULT_OPTIONS, extra)


@pytest.mark.parametrize(("item", "message"), [
    ("-avzx --numeric-ids", "'-avzx --numeric-ids' is 2 words in one item: write one option "
                            "per item, e.g. [-avzx, --numeric-ids]"),
    ("--bwlimit 1000", "'--bwlimit 1000' is not one option: a long option is --name or "
                       "--name=value (write --bwlimit=1000)"),
    ("-B 1024", "'-B 1024' is not one option: short options are letters after one '-' "
                "(-avzx), a value follows its letter directly (-B1024)"),
    ("-a,x", "'-a,x' is not one option"),
    ("--rsh=ssh -p 2", "'--rsh=ssh -p 2' is not allowed here: the ssh command is built"),
])
def test_each_list_item_is_exactly_one_option_at_its_own_line(item, message):
    for field in ("options", "extra_options"):
        text = BASE + f"    backup:\n      {field}:\n        - --checksum\n        - '{item}'\n"
        with pytest.raises(InventoryError) as caught:
            load_text(text)
        (line,) = caught.value.problems
        assert line.startswith(f"inventory.yaml:9: hosts.a.backup.{field}[1]: {message}"), line


def test_a_backup_option_problem_is_one_line_in_the_tasks_and_pullback_backup(tmp_path):
    import subprocess
    import sys
    bin_dir = Path(sys.executable).parent
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(BASE + "    backup:\n      options:\n        - -avzx --numeric-ids\n")
    wanted = (f"{inventory}:8: hosts.a.backup.options[0]: '-avzx --numeric-ids' is 2 words in "
              "one item: write one option per item, e.g. [-avzx, --numeric-ids]\n")
    for argv in ([str(bin_dir / "invoke"), "backup", "--dry-run"],
                 [str(bin_dir / "pullback-backup"), "--dry-run"]):
        result = subprocess.run([*argv, "--inventory", str(inventory)], cwd=ROOT,
                                capture_output=True, text=True, check=False, timeout=60,
                                env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
        assert (result.returncode, result.stderr) == (2, wanted), result


# --- backup.system_exclude ---------------------------------------------------------------------


def test_system_exclude_defaults_and_anchors_below_the_source():
    from roles.core.rsync import SYSTEM_EXCLUDE

    host = load_text(BASE).hosts["a"]
    assert host.backup.system_exclude == SYSTEM_EXCLUDE
    assert {"/proc/*", "/sys/*", "/dev/*", "/run/*", "/tmp/*", "/var/tmp/*",
            "/var/cache/apt/archives/*", "/swapfile"} <= set(SYSTEM_EXCLUDE)
    assert host.backup.pull_exclude == SYSTEM_EXCLUDE
    var = load_text(BASE + "    backup: {source: /var, exclude: ['*.log']}\n").hosts["a"]
    assert var.backup.pull_exclude == ("/tmp/*", "/cache/apt/archives/*", "*.log")
    # A pull of a left-out folder itself means to copy it; elsewhere none applies.
    for source in ("/var/tmp", "/srv/data", "/tmp"):
        text = BASE + f"    backup: {{source: {source}}}\n"
        assert load_text(text).hosts["a"].backup.pull_exclude == ()
    text = BASE + "    backup: {system_exclude: [], exclude: [/x]}\n"
    assert load_text(text).hosts["a"].backup.pull_exclude == ("/x",)


@pytest.mark.parametrize(("pattern", "message"), [
    ("tmp/*", "'tmp/*' must be an absolute path on the server below /"),
    ("/", "'/' must be an absolute path on the server below /"),
    ("/*", "'/*' must be an absolute path on the server below /"),
    ("/var/../etc", "must not contain '..'"),
])
def test_system_exclude_refuses_what_is_not_a_path_below_root(pattern, message):
    with pytest.raises(InventoryError) as caught:
        load_text(BASE + f"    backup: {{system_exclude: ['{pattern}']}}\n")
    (line,) = caught.value.problems
    assert line.startswith(f"inventory.yaml:6: hosts.a.backup.system_exclude: {message}"), line


# --- backup.extra_sources ---------------------------------------------------------------------


def test_extra_sources_below_source_normalised():
    host = load_text(BASE + "    backup: {extra_sources: [/home/, /boot]}\n").hosts["a"]
    assert host.backup.extra_sources == ("/home", "/boot")
    host = load_text(BASE + "    backup: {source: /srv/, extra_sources: [/srv/data]}\n"
                     ).hosts["a"]
    assert host.backup.extra_sources == ("/srv/data",)
    assert load_text(BASE).hosts["a"].backup.extra_sources == ()


@pytest.mark.parametrize("backup,message", [
    ("{extra_sources: [/]}", "'/' must be a path below backup.source '/'"),
    ("{source: /srv, extra_sources: [/srv]}", "'/srv' must be a path below backup.source"),
    ("{source: /srv, extra_sources: [/home]}", "'/home' must be a path below backup.source"),
    ("{source: /srv, extra_sources: [/srvx/a]}", "'/srvx/a' must be a path below"),
    ("{extra_sources: [home]}", "must be an absolute path"),
    ("{extra_sources: [/a/../b]}", "must not contain '..'"),
    ("{extra_sources: [/a/./b]}", "must be a plain path"),
    ("{extra_sources: [/home, /home/]}", "'/home/' is listed twice"),
])
def test_extra_sources_refused(backup, message):
    with pytest.raises(InventoryError) as exc:
        load_text(BASE + f"    backup: {backup}\n")
    (line,) = exc.value.problems
    assert "hosts.a.backup" in line and "extra_sources" in line and message in line, line
