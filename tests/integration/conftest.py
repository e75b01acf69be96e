"""The container lab for integration tests: real sshd, real sudo, real rsync.

One image build per session; one shared container for read-only tests; a fresh
container for every test that changes or damages a host. Containers are named
``pullback-test-*`` and carry the lab label; only those are removed at the end.
``lab_env.start(tag, release="trixie")`` builds that release's image on first use.

A module whose tests back up from one host of its own opens it with ``lab_server``: the
container (seeded, set up by setup-remote's ``setup_host`` unless told not to), a work
folder, and the module's inventory defaults, from which ``LabServer.spec`` writes each
test's inventory. The tests run pullback as a user does with ``invoke`` (and
``pullback-backup``, ``PROGRAM``) and prepare or inspect the host with ``sh``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import http.server
import itertools
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab import hosts as lab
from lab import mirror
from roles.core.outcome import Outcome
from roles.core.spec import HostSpec
from roles.features.setup_remote import setup_host
from roles.inventory.schema import load
from roles.local import keys

ROOT = Path(__file__).resolve().parents[2]
INVOKE = str(Path(sys.executable).parent / "invoke")
PROGRAM = str(Path(sys.executable).parent / "pullback-backup")
NO_AGENT = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
PREFIX = "pullback-test"
_counter = itertools.count(1)
_build_lock = threading.Lock()
_release_locks: dict[str, threading.Lock] = {}


def pytest_configure(config: pytest.Config) -> None:
    # Until pyproject.toml lists it (the lead's file): --strict-markers needs it registered.
    config.addinivalue_line(
        "markers", "matrix: the remote OS matrix (one lab host per Debian release)"
    )


@dataclass
class Lab:
    image: str
    state: Path
    started: list[str] = field(default_factory=list)
    images: dict[str, str] = field(default_factory=dict)  # release -> remote image

    def image_for(self, release: str) -> str:
        """The remote image of ``release``, built once (debootstrap + build, about a minute)."""
        # Hosts may be started from threads: one build per release, releases in parallel.
        with _build_lock:
            lock = _release_locks.setdefault(release, threading.Lock())
        with lock:
            if release not in self.images:
                self.images[release] = lab.build_images(release)
            return self.images[release]

    def systemd_image(self) -> str:
        """The systemd flavour of the default release (systemd is PID 1 and runs sshd)."""
        with _build_lock:
            if "systemd" not in self.images:
                self.images["systemd"] = lab.build_images(systemd=True)
            return self.images["systemd"]

    def start(self, tag: str = "", image: str | None = None,
              release: str | None = None, tmpfs: tuple[str, ...] = ()) -> lab.LabHost:
        """A new container; ``tmpfs``: paths inside it that get their own tmpfs mount."""
        if image is None and release is not None:
            image = self.image_for(release)
        name = f"{PREFIX}-{os.getpid()}-{next(_counter)}{'-' + tag if tag else ''}"
        self.started.append(name)
        host = lab.ensure_host(name, image or self.image, tmpfs=tmpfs)
        return host

    def start_releases(self, releases: list[str] | tuple[str, ...], prefix: str = "",
                       tmpfs: tuple[str, ...] = ()) -> dict[str, lab.LabHost]:
        """One container per release (tag ``<prefix><release>``), the images built and the
        containers started concurrently; release -> host."""
        with ThreadPoolExecutor(max_workers=len(releases)) as pool:
            started = list(pool.map(
                lambda r: self.start(f"{prefix}{r}", release=r, tmpfs=tmpfs), releases))
        return dict(zip(releases, started, strict=True))

    def remove(self, host: lab.LabHost) -> None:
        lab.remove(host.name)
        self.started.remove(host.name)

    def inventory(self, hosts: list[lab.LabHost], path: Path | None = None,
                  defaults: dict[str, Any] | None = None,
                  per_host: dict[str, dict[str, Any]] | None = None,
                  others: dict[str, dict[str, Any]] | None = None) -> Path:
        """Write an inventory (and its known_hosts) for ``hosts``; return its path.

        ``defaults`` go over the lab's own, one level deep; ``others``: hosts that are not
        lab hosts (a TEST-NET address never contacted, a closed port), name -> entry.
        """
        path = path or self.state / f"inventory-{next(_counter)}.yaml"
        known_hosts = path.with_suffix(".known_hosts")
        lab.write_known_hosts(hosts, known_hosts)
        base: dict[str, Any] = {
            "admin_user": "admin",
            "admin_key": str(lab.admin_key()),
            "known_hosts": str(known_hosts),
            "backup_key": str(self.state / "backup_ed25519"),
            # pytest's base temporary folder: the tests' destinations lie below it. Mirror
            # mode (DEST/tree), which most tests compare against the server; the default
            # keeps snapshots, and the tests of snapshots say so.
            "backup": {"destination": str(self.state / "backups" / "{name}"),
                       "allow_destination": str(self.state.parent), "snapshots": 0},
            # The lab pins 3.2.7 (built offline), and local_prefix usually has no build, so
            # PATH's rsync runs, whatever its version (Debian 12: 3.2.7): the switch is on.
            # Tests of the refusal turn it off.
            "rsync": {"version": "3.2.7", "url": "file:///nonexistent/rsync-{version}.tar.gz",
                      "local_prefix": str(self.state / "local"), "allow_vulnerable": True},
        }
        data = {
            "defaults": merged(base, defaults or {}),
            "hosts": {
                **{h.name: {"address": "127.0.0.1", "port": h.port,
                            **(per_host or {}).get(h.name, {})} for h in hosts},
                **(others or {}),
            },
        }
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def ssh_config(self, hosts: list[lab.LabHost]) -> Path:
        path = self.state / f"ssh_config-{next(_counter)}"
        known_hosts = path.with_suffix(".known_hosts")
        lab.write_known_hosts(hosts, known_hosts)
        lab.write_ssh_config(hosts, path, known_hosts, lab.admin_key())
        return path


@pytest.fixture(scope="session")
def lab_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    image = lab.build_images()
    env = Lab(image=image, state=tmp_path_factory.mktemp("lab"),
              images={lab.DEFAULT_RELEASE: image})
    try:
        yield env
    finally:
        if env.started:
            lab.remove(*env.started)


@pytest.fixture(scope="session")
def shared_host(lab_env: Lab) -> lab.LabHost:
    """One lab container for tests that only read."""
    return lab_env.start("shared")


@pytest.fixture
def fresh_host(lab_env: Lab) -> Iterator[lab.LabHost]:
    """A new lab container for a test that changes or damages the host."""
    host = lab_env.start()
    yield host
    lab_env.remove(host)


def merged(base: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """``more`` over ``base``, one level deep: a section (a dict) is merged key by key."""
    out = dict(base)
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


# --- one lab host per module, as the backup source of its tests ----------------------------


def invoke(*args: str, timeout: float = 300, env: dict[str, str] = NO_AGENT
           ) -> subprocess.CompletedProcess:
    """``invoke ARGS`` as a user runs it in the project: no terminal, no input, and no
    ssh-agent (only the keys the inventory names may log in)."""
    return subprocess.run([INVOKE, *args], cwd=ROOT, capture_output=True, timeout=timeout,
                          text=True, encoding="utf-8", errors="replace", check=False,
                          stdin=subprocess.DEVNULL, env=env)


def sh_bytes(host: lab.LabHost, script: str, timeout: float = 120) -> bytes:
    """Run ``script`` as root inside the container; its standard output."""
    return lab.engine("exec", host.name, "sh", "-c", script, timeout=timeout).stdout


def sh(host: lab.LabHost, script: str, timeout: float = 120) -> str:
    return sh_bytes(host, script, timeout).decode()


def set_up(host: HostSpec) -> Outcome:
    """The backup key (made once), then setup-remote's ``setup_host``; it must succeed."""
    keys.ensure_backup_key(Path(host.backup_key))
    outcome = setup_host(host)
    assert outcome.error is None, outcome
    return outcome


@dataclass
class LabServer:
    """One module's lab host, the server its tests back up: the container, a work folder,
    the module's inventory defaults and where the backups go (``backups``: one folder below
    ``work`` for every inventory; else one per inventory name); ``inventory``/``host``:
    what it was set up with, ``outcome``: setup's (None when the module sets it up itself).
    """

    env: Lab
    lab: lab.LabHost
    work: Path
    defaults: dict[str, Any]
    backups: str | None = None
    inventory: Path = field(init=False)
    host: HostSpec = field(init=False)
    outcome: Outcome | None = None

    @property
    def name(self) -> str:
        return self.lab.name

    def write(self, name: str, *, file: str | None = None, dest: str | None = None,
              others: dict[str, dict[str, Any]] | None = None, **more: Any) -> Path:
        """The inventory ``work/<file or name>.yaml`` of this host (and ``others``, hosts
        never set up): the backups in ``work/<dest>`` (default: the module's ``backups``,
        else ``name``), the module's defaults, then ``more``."""
        dest = str(self.work / (dest or self.backups or name) / "{name}")
        defaults = merged(merged({"backup": {"destination": dest}}, self.defaults), more)
        return self.env.inventory([self.lab], path=self.work / f"{file or name}.yaml",
                                  defaults=defaults, others=others)

    def spec(self, name: str, **more: Any) -> tuple[Path, HostSpec]:
        """``write``, and the host as that inventory has it."""
        path = self.write(name, **more)
        return path, load(path).hosts[self.lab.name]


@contextlib.contextmanager
def lab_server(lab_env: Lab, tmp_path_factory: pytest.TempPathFactory, tag: str, *,
               defaults: dict[str, Any] | None = None, backups: str | None = None,
               seed: str = "", tmpfs: tuple[str, ...] = (), name: str = "setup",
               others: dict[str, dict[str, Any]] | None = None, setup: bool = True,
               ) -> Iterator[LabServer]:
    """A module's server: a new container ``tag`` (``tmpfs``: its own mounts), ``seed`` run
    in it as root, the inventory ``name`` written and the host set up with it (``setup``;
    else only the backup key is made); the container is removed afterwards."""
    work = tmp_path_factory.mktemp(tag)
    remote = lab_env.start(tag, tmpfs=tmpfs)
    try:
        if seed:
            sh(remote, seed)
        server = LabServer(lab_env, remote, work, defaults or {}, backups)
        server.inventory, server.host = server.spec(name, others=others)
        if setup:
            server.outcome = set_up(server.host)
        else:
            keys.ensure_backup_key(Path(server.host.backup_key))
        yield server
    finally:
        lab_env.remove(remote)


@contextlib.contextmanager
def held_lock(host: HostSpec, text: str = "4711\n") -> Iterator[None]:
    """The host's lock held, as a running backup holds it, with ``text`` (its pids) in it."""
    lock = Path(host.destination + ".pullback") / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.seek(0)
        held.truncate()
        held.write(text)
        held.flush()
        yield


def infra_host(lab_env: Lab, host: lab.LabHost, sudo: bool = True) -> Any:
    import testinfra

    config = lab_env.ssh_config([host])
    return testinfra.get_host(f"ssh://{host.name}", ssh_config=str(config), sudo=sudo)


# --- a loopback HTTP server (rsync source mirrors for the build tests) ------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@contextlib.contextmanager
def serve_directory(root: Path) -> Iterator[str]:
    """Serve ``root`` on 127.0.0.1 (a free port) in a thread; yield ``http://127.0.0.1:PORT``."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def serve_tarballs(root: Path, tarballs: list[Path]) -> Iterator[str]:
    """``tarballs`` in ``root`` under upstream's layout, served as ``serve_directory`` does;
    yield the ``rsync.url`` for them (``.../rsync-{version}.tar.gz``)."""
    mirror.populate(root, tarballs)
    with serve_directory(root) as base:
        yield f"{base}/{mirror.UPSTREAM_LAYOUT}"


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
