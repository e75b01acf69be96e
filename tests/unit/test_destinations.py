"""roles.core.destinations: the roots a backup may live below, and what it may never be."""

from __future__ import annotations

import pytest

from roles.core import destinations as d
from roles.inventory.schema import TOOLKIT, InventoryError, load_text

KEEP_OUT = [("the backup key", "/etc/pullback/backup_ed25519"),
            ("known_hosts", "/root/.ssh/known_hosts"),
            ("the toolkit", "/srv/pullback")]


@pytest.mark.parametrize("dest", [
    "/var/backups/pullback/web1", "/var/backups/web1", "/srv/backups/web1", "/srv/web1",
    "/mnt/usb/web1", "/media/disk/web1", "/backup/web1", "/backups/web1", "/backup2/x/web1",
    "/data/web1", "/data1/backups/web1", "/srv/pullback-backups/web1",
])
def test_destinations_below_the_allowed_roots_pass(dest):
    assert d.destination_problem(dest, keep_out=KEEP_OUT) is None


@pytest.mark.parametrize(("dest", "why"), [
    ("/", "/ is a system folder"),
    ("/etc", "/etc is a system folder"),
    ("/etc/", "/etc/ is a system folder"),
    ("/etc/pullback/backups", "inside the system folder /etc"),
    ("/usr/local", "inside the system folder /usr"),
    ("/usr/local/backups/web1", "inside the system folder /usr"),
    ("/var/log", "/var/log is a system folder"),
    ("/var/log/backups/web1", "inside the system folder /var/log"),
    ("/var/lib/mysql", "inside the system folder /var/lib"),
    ("/boot/x", "inside the system folder /boot"),
    ("/home", "/home is a system folder"),
    ("/home/alice", "/home/alice is a home folder"),
    ("/root", "/root is a home folder"),
    ("/var", "/var is a system folder"),
    ("/tmp", "/tmp is a system folder"),
    ("/srv", "/srv is a system folder"),  # a root itself is never a DEST
    ("/var/backups", "/var/backups is a system folder"),
    ("/mnt", "/mnt is a system folder"),
    ("/backup", "not below a folder meant for backups"),
    ("/data", "not below a folder meant for backups"),
    ("/opt/backups/web1", "not below a folder meant for backups"),
    ("/home/alice/backups/web1", "not below a folder meant for backups"),
    ("/root/backups/web1", "not below a folder meant for backups"),
    ("/var/backupsX/web1", "not below a folder meant for backups"),
    ("/srvx/web1", "not below a folder meant for backups"),
    ("/tmp/backups/web1", "not below a folder meant for backups"),
    ("/srv/../etc/web1", "inside the system folder /etc"),
    # The toolkit, its key and its known_hosts: never the folder of one, nor holding one.
    ("/srv/pullback", "holds the toolkit /srv/pullback"),
    ("/srv", "is a system folder"),
    ("/srv/pullback/.state", None),  # inside the toolkit's folder: a folder of its own
])
def test_destinations_that_are_refused(dest, why):
    problem = d.destination_problem(dest, keep_out=KEEP_OUT)
    if why is None:
        assert problem is None
    else:
        assert problem is not None and why in problem, problem


def test_the_state_folder_beside_dest_may_not_hold_the_toolkit_either():
    keep = [("the backup key", "/srv/web1.pullback/key")]
    assert "holds the backup key" in d.destination_problem("/srv/web1", keep_out=keep)


def test_the_folder_of_the_backup_key_is_refused():
    keep = [("the backup key", "/srv/keys/backup_ed25519")]
    assert "holds the backup key" in d.destination_problem("/srv/keys", keep_out=keep)
    assert d.destination_problem("/srv/keys/web1", keep_out=keep) is None


@pytest.mark.parametrize(("allow", "dest", "ok"), [
    ("/opt/backups", "/opt/backups/web1", True),
    ("/opt/backups", "/opt/backups", False),  # strictly below
    ("/opt/backups", "/opt/other/web1", False),
    ("/home/alice/pullback/.state/lab/backups", "/home/alice/pullback/.state/lab/backups/h",
     True),
    ("/home", "/home/alice", False),  # still a home folder
    ("/var/root/backups", "/var/root/backups/example.com", True),
])
def test_allow_destination_adds_one_root(allow, dest, ok):
    assert (d.destination_problem(dest, allow=allow) is None) == ok


@pytest.mark.parametrize(("allow", "why"), [
    ("/", "/ cannot be allowed"),
    ("/etc", "/etc is a system folder"),
    ("/usr/local/backups", "inside the system folder /usr"),
    ("/var/log/x", "inside the system folder /var/log"),
])
def test_allow_destination_cannot_open_the_system(allow, why):
    assert why in d.allow_problem(allow)


@pytest.mark.parametrize(("a", "b", "meet"), [
    ("/srv/b/web1", "/srv/b/web2", False),
    ("/srv/b/web1", "/srv/b/web1", True),
    ("/srv/b/web1", "/srv/b/web1/", True),
    ("/srv/b", "/srv/b/web1", True),  # one holds the other
    ("/srv/b/web1.pullback", "/srv/b/web1", True),  # one's state folder is the other's DEST
    ("/srv/b/web1.pullback/x", "/srv/b/web1", True),
    ("/srv/b/web1x", "/srv/b/web1", False),
])
def test_two_destinations_meet(a, b, meet):
    assert d.dests_meet(a, b) == meet and d.dests_meet(b, a) == meet


# --- in the inventory ---------------------------------------------------------------------------

HOSTS = """\
defaults: {admin_user: u, backup_key: /etc/pullback/k, known_hosts: /etc/pullback/kh}
hosts:
  web1: {address: 192.0.2.1}
  web2: {address: 192.0.2.2%s}
"""


def test_the_default_destination_passes():
    hosts = load_text(HOSTS % "").hosts
    assert hosts["web1"].destination == "/var/backups/pullback/web1"


@pytest.mark.parametrize(("extra", "line"), [
    (", backup: {destination: /var/backups/pullback/web1}",
     "inventory.yaml:4: hosts.web2.backup.destination: /var/backups/pullback/web1 (host web2) "
     "and /var/backups/pullback/web1 (host web1) share a folder (or one holds the other, or "
     "its .pullback state): each host needs its own, e.g. with {name}"),
    (", backup: {destination: /var/backups/pullback}",
     "inventory.yaml:4: hosts.web2.backup.destination: /var/backups/pullback (host web2) and "
     "/var/backups/pullback/web1 (host web1) share a folder (or one holds the other, or its "
     ".pullback state): each host needs its own, e.g. with {name}"),
])
def test_two_hosts_may_not_share_a_destination(extra, line):
    with pytest.raises(InventoryError) as caught:
        load_text(HOSTS % extra)
    assert caught.value.problems == [line]


@pytest.mark.parametrize(("extra", "why"), [
    (", backup: {destination: '/home/{name}'}", "/home/web2 is a home folder"),
    (", backup: {destination: /usr/local}", "/usr/local is inside the system folder /usr"),
    (", backup: {destination: /etc/pullback/web2}", "inside the system folder /etc"),
    (", backup: {destination: /srv/keys}, backup_key: /srv/keys/k", "holds the backup key"),
    (", backup: {destination: '/opt/b/{name}'}", "not below a folder meant for backups"),
    (f", backup: {{destination: '{TOOLKIT}/..'}}", "'..'"),
    (", backup: {destination: '/opt/b/{name}', allow_destination: /}", "/ cannot be allowed"),
    (", backup: {destination: '~/b/{name}'}", "must be an absolute path"),
])
def test_refused_destinations_in_the_inventory(extra, why):
    with pytest.raises(InventoryError) as caught:
        load_text(HOSTS % extra)
    (problem,) = caught.value.problems
    assert problem.startswith("inventory.yaml:4: hosts.web2.backup.")
    assert why in problem and "\n" not in problem


def test_the_toolkits_folder_is_refused_even_when_allowed():
    parent = TOOLKIT.rsplit("/", 1)[0] or "/"
    text = HOSTS % f", backup: {{destination: {TOOLKIT}, allow_destination: {parent}}}"
    with pytest.raises(InventoryError, match="holds the toolkit"):
        load_text(text)


def test_allow_destination_admits_the_labs_state_folder():
    state = f"{TOOLKIT}/.state/lab/backups"
    text = HOSTS % f", backup: {{destination: '{state}/{{name}}', allow_destination: {state}}}"
    assert load_text(text).hosts["web2"].destination == f"{state}/web2"


def test_the_labs_inventory_allows_its_state_folder_explicitly():
    """`invoke lab.up` writes destinations into .state/lab/backups in the repository: not a
    root meant for backups, so the lab's inventory names it in backup.allow_destination."""
    from lab import hosts as lab

    state = lab.state_dir()
    hosts = [lab.LabHost(f"pullback-lab-{i}", 2200 + i, "ssh-ed25519 AAAA") for i in (1, 2)]
    inventory = load_text(lab.render_inventory(hosts, None, state))
    for host in inventory.hosts.values():
        assert host.destination == f"{state}/backups/{host.name}"
        assert host.backup.allow_destination == f"{state}/backups"
    assert not str(state).startswith(tuple(d.EXTRA_ROOTS))  # not merely the test seam
