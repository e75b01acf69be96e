"""The container lab for integration tests: real sshd, real sudo, real rsync.

One image build per session; one shared container for read-only tests; a fresh
container for every test that changes or damages a host. Containers are named
``pullback-test-*`` and carry the lab label; only those are removed at the end.
``lab_env.start(tag, release="trixie")`` builds that release's image on first use.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import itertools
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab import hosts as lab

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

    def remove(self, host: lab.LabHost) -> None:
        lab.remove(host.name)
        self.started.remove(host.name)

    def inventory(self, hosts: list[lab.LabHost], path: Path | None = None,
                  defaults: dict[str, Any] | None = None,
                  per_host: dict[str, dict[str, Any]] | None = None) -> Path:
        """Write an inventory (and its known_hosts) for ``hosts``; return its path."""
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
        for key, value in (defaults or {}).items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        data = {
            "defaults": base,
            "hosts": {
                h.name: {"address": "127.0.0.1", "port": h.port, **(per_host or {}).get(h.name, {})}
                for h in hosts
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


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
