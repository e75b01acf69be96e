"""The container lab: local containers that play the remote servers.

Images are built offline-capable: ``debootstrap`` makes a Debian root file system from
Debian's archive (no container registry is needed), ``import`` turns it into a base image,
and ``lab/Containerfile`` adds the toolchain and an ``admin`` user with sudo. Containers
publish sshd on a random 127.0.0.1 port; their host keys are read with ``exec`` (never
trusted on first use) into the lab's ``known_hosts``, and a lab inventory is written under
``.state/lab/``. Only containers carrying this lab's label are ever removed.

Every Debian release marked tested in ``roles/core/platforms.py`` (bullseye, bookworm, trixie)
is built the same way: this machine's debootstrap (bookworm's) has scripts for all three
and debian-archive-keyring 2023.3 already holds the trixie archive keys, so signatures are
checked with the stock keyring. ``up(releases=[...])`` starts one container per release,
named after it, and builds the missing images concurrently.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lab import mirror
from roles.core import platforms
from roles.core.rsync import client_exposure
from roles.local import state

ROOT = Path(__file__).resolve().parent.parent
LAB_DIR = ROOT / "lab"
STATE = state.STATE
LABEL = "io.pullback.lab"
PREFIX = "pullback-lab"


def state_dir(prefix: str = PREFIX) -> Path:
    """Where a lab keeps its inventory, keys and mirror: ``.state/lab`` for the default."""
    return STATE / ("lab" if prefix == PREFIX else prefix)

DEFAULT_RELEASE = "bookworm"
# The releases the lab can play and the matrix test proves: the tested Debian rows.
RELEASES: tuple[str, ...] = tuple(
    p.codename for p in platforms.tested() if "debian" in p.os_ids and p.codename
)
_RELEASE = re.compile(r"^[a-z][a-z0-9-]{1,30}$")
BASE_PACKAGES = "openssh-server,rsync,sudo,python3,procps,ca-certificates"
DEFAULT_RSYNC_VERSION = "3.2.7"


class LabError(Exception):
    pass


@dataclass(frozen=True)
class LabHost:
    name: str
    port: int
    host_key: str  # "ssh-ed25519 AAAA..."
    release: str = ""  # the Debian codename of the container's image

    @property
    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_key}"


# --- the engine ---------------------------------------------------------------------------


def engine_name() -> str:
    chosen = os.environ.get("PULLBACK_ENGINE")
    if chosen:
        return chosen
    for name in ("podman", "docker"):
        if shutil.which(name):
            return name
    raise LabError("no container engine: install podman (apt-get install podman runc) or docker")


def engine_env() -> dict[str, str]:
    env = dict(os.environ)
    if engine_name() == "podman":
        env.setdefault("CONTAINERS_CONF", str(LAB_DIR / "containers.conf"))
    return env


def engine(*args: str, check: bool = True, input: bytes | None = None,
           capture: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    argv = [engine_name(), *args]
    result = subprocess.run(
        argv, input=input, capture_output=capture, env=engine_env(), check=False,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        err = (result.stderr or b"").decode(errors="replace").strip().splitlines()
        raise LabError(f"{' '.join(argv[:3])} ... failed: {err[-1] if err else result.returncode}")
    return result


def _out(result: subprocess.CompletedProcess) -> str:
    return (result.stdout or b"").decode(errors="replace").strip()


def image_exists(image: str) -> bool:
    return engine("image", "inspect", image, check=False).returncode == 0


# --- images -------------------------------------------------------------------------------


def base_image(release: str) -> str:
    return f"localhost/pullback-lab-base:{release}"


def _recipe_digest() -> str:
    """A short hash of the image recipe: a changed Containerfile means a new image tag."""
    digest = hashlib.sha256()
    for name in ("Containerfile", "entrypoint.sh", "pullback-lab-keys.service"):
        digest.update((LAB_DIR / name).read_bytes())
    return digest.hexdigest()[:10]


def remote_image(release: str, compiler: bool = True, systemd: bool = False) -> str:
    kind = ("remote" if compiler else "bare") + ("-systemd" if systemd else "")
    return f"localhost/pullback-lab-{kind}:{release}-{_recipe_digest()}"


def is_systemd_image(image: str) -> bool:
    """The systemd flavour (``remote_image(..., systemd=True)``): started with /sbin/init."""
    return image.rpartition(":")[0].endswith("-systemd")


def parse_releases(text: str) -> list[str]:
    """``"bullseye, trixie"`` -> ``["bullseye", "trixie"]``: codenames, in order, once each."""
    releases = list(dict.fromkeys(r.strip().lower() for r in text.split(",") if r.strip()))
    if not releases:
        raise LabError("no release given: e.g. --os " + ",".join(RELEASES))
    for release in releases:
        if not _RELEASE.match(release):
            raise LabError(f"{release!r} is not a Debian codename (e.g. {', '.join(RELEASES)})")
    return releases


def build_base(release: str = DEFAULT_RELEASE, log=print) -> str:
    if not _RELEASE.match(release):
        raise LabError(f"{release!r} is not a Debian codename")
    image = base_image(release)
    if image_exists(image):
        return image
    if shutil.which("debootstrap") is None:
        raise LabError("debootstrap is missing: apt-get install debootstrap")
    STATE.mkdir(parents=True, exist_ok=True)
    log(f"lab: debootstrap {release} (about a minute, once)")
    with tempfile.TemporaryDirectory(dir=STATE, prefix="rootfs-") as rootfs:
        result = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", release,
             rootfs, "http://deb.debian.org/debian"],
            capture_output=True, check=False,
        )
        if result.returncode != 0:
            tail = result.stdout.decode(errors="replace").strip().splitlines()[-5:]
            raise LabError(f"debootstrap {release} failed: {' / '.join(tail)}")
        # Without the archive keys debootstrap only warns and goes on unverified.
        if b"Valid Release signature" not in result.stdout:
            raise LabError(f"debootstrap {release}: the Release file was not verified; "
                           "install (or update) debian-archive-keyring")
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(
                [engine_name(), "import", "-", image], stdin=tar.stdout,
                capture_output=True, env=engine_env(), check=False,
            )
        finally:
            if tar.stdout:
                tar.stdout.close()
            tar.wait()
        if imported.returncode != 0:
            raise LabError(f"image import failed: {imported.stderr.decode(errors='replace')}")
    return image


def build_images(release: str = DEFAULT_RELEASE, compiler: bool = True, log=print,
                 systemd: bool = False) -> str:
    """Build (once) the base and the remote-server image; return the remote image name.

    ``systemd``: the flavour whose PID 1 is systemd, which runs sshd as ``ssh.service``."""
    base = build_base(release, log=log)
    image = remote_image(release, compiler, systemd)
    if image_exists(image):
        return image
    log(f"lab: building {image}")
    engine(
        "build", "-t", image, "-f", str(LAB_DIR / "Containerfile"),
        "--build-arg", f"BASE={base}", "--build-arg", f"COMPILER={int(compiler)}",
        "--build-arg", f"SYSTEMD={int(systemd)}", str(LAB_DIR),
    )
    return image


def build_releases(releases: Sequence[str], compiler: bool = True,
                   log=print, systemd: bool = False) -> dict[str, str]:
    """Build the images of several releases at once (debootstrap is mostly waiting on the
    archive); return release -> remote image."""
    if len(releases) <= 1:
        return {r: build_images(r, compiler, log=log, systemd=systemd) for r in releases}
    with ThreadPoolExecutor(max_workers=len(releases)) as pool:
        images = list(pool.map(lambda r: build_images(r, compiler, log=log, systemd=systemd),
                               releases))
    return dict(zip(releases, images, strict=True))


# --- keys and state -----------------------------------------------------------------------


_key_lock = threading.Lock()  # containers start from threads; ssh-keygen must run once


def ensure_key(path: Path, comment: str) -> Path:
    with _key_lock:
        return _ensure_key(path, comment)


def _ensure_key(path: Path, comment: str) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True,
        )
    return path


def admin_key() -> Path:
    return ensure_key(state_dir() / "admin_ed25519", "pullback-lab-admin")


# --- containers ---------------------------------------------------------------------------


def container_names(prefix: str = PREFIX) -> list[str]:
    """Names of the containers carrying the lab label (and ``prefix``, when given)."""
    result = engine("ps", "-a", "--filter", f"label={LABEL}", "--format", "{{.Names}}")
    names = [n for n in _out(result).split() if n]
    return sorted(n for n in names if not prefix or n == prefix or n.startswith(prefix + "-"))


def is_running(name: str) -> bool:
    result = engine("inspect", "--format", "{{.State.Running}}", name, check=False)
    return result.returncode == 0 and _out(result) == "true"


def published_port(name: str) -> int:
    text = _out(engine("port", name, "22"))
    # "127.0.0.1:40123" (podman/docker may print several lines)
    for line in text.splitlines():
        host, _, port = line.rpartition(":")
        if host.startswith("127.0.0.1") and port.isdigit():
            return int(port)
    raise LabError(f"{name}: sshd is not published on 127.0.0.1: {text!r}")


def wait_for_sshd(name: str, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.settimeout(2)
                banner = sock.recv(64)
                if banner.startswith(b"SSH-"):
                    return
                last = repr(banner)
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    logs = _out(engine("logs", name, check=False)) or "(no logs)"
    raise LabError(f"{name}: sshd did not answer on 127.0.0.1:{port} ({last}); logs: {logs[-300:]}")


def read_host_key(name: str) -> str:
    text = _out(engine("exec", name, "cat", "/etc/ssh/ssh_host_ed25519_key.pub"))
    fields = text.split()
    if len(fields) < 2 or fields[0] != "ssh-ed25519":
        raise LabError(f"{name}: unexpected host key {text!r}")
    return f"{fields[0]} {fields[1]}"


_CPUSET = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def start(name: str, image: str, *, tmpfs: Sequence[str] = (),
          cpuset: str | None = None) -> None:
    """Run container ``name``; ``tmpfs``: absolute paths that get a tmpfs of their own
    (``--tmpfs PATH``: a second file system inside the tree, as ``rsync -x`` must skip).

    ``cpuset`` (``"1"``, ``"2-3"``, ``"0,2"``): the only CPUs the container may use
    (``--cpuset-cpus``); ``nproc`` inside reports their number. The benchmarks use it to
    give a lab host CPUs of its own, as a real server has."""
    pubkey = (admin_key().with_suffix(".pub")).read_text().strip()
    mounts: list[str] = []
    for path in tmpfs:
        if not path.startswith("/") or "," in path or ":" in path:
            raise LabError(f"--tmpfs wants an absolute path without ',' or ':': {path!r}")
        mounts += ["--tmpfs", path]
    limits: list[str] = []
    if cpuset is not None:
        if not _CPUSET.match(cpuset):
            raise LabError(f"cpuset wants CPU numbers like 1, 0-1 or 0,2: {cpuset!r}")
        limits += ["--cpuset-cpus", cpuset]
    # The systemd flavour runs systemd as PID 1 (podman sets up its cgroups and stop
    # signal); the others run the engine's small init, which forwards SIGHUP to sshd.
    init = ["--systemd=always"] if is_systemd_image(image) else ["--init"]
    command = ["/sbin/init"] if is_systemd_image(image) else []
    engine(
        "run", "-d", "--name", name, "--hostname", name, *init,
        "--label", f"{LABEL}=1", "-p", "127.0.0.1::22", *mounts, *limits,
        "-e", f"PULLBACK_ADMIN_PUBKEY={pubkey}", image, *command,
    )


def host_names(prefix: str, count: int, releases: Sequence[str] | None = None,
               release: str = DEFAULT_RELEASE) -> list[tuple[str, str]]:
    """(name, release) of each container: ``P-1..P-N`` of ``release`` for the plain form,
    ``P-RELEASE`` (``P-RELEASE-1..N`` with a count) when ``releases`` are named."""
    if count < 1:
        raise LabError("--count must be at least 1")
    if not releases:
        return [(f"{prefix}-{i}", release) for i in range(1, count + 1)]
    if count == 1:
        return [(f"{prefix}-{r}", r) for r in releases]
    return [(f"{prefix}-{r}-{i}", r) for r in releases for i in range(1, count + 1)]


def up(count: int = 1, prefix: str = PREFIX, release: str = DEFAULT_RELEASE,
       compiler: bool = True, log=print,
       releases: Sequence[str] | None = None, cpuset: str | None = None,
       systemd: bool = False) -> list[LabHost]:
    """Start (or reuse) lab containers: ``count`` of ``release``, or ``count`` of each of
    ``releases`` (named after the release). Images are built first, concurrently.
    ``cpuset``: see ``start`` (applies to containers started here, not reused ones).
    ``systemd``: the flavour whose PID 1 is systemd (a running container of the other
    flavour is replaced, as for any other image)."""
    wanted = host_names(prefix, count, releases, release)
    images = build_releases(list(dict.fromkeys(r for _, r in wanted)), compiler, log=log,
                            systemd=systemd)
    with ThreadPoolExecutor(max_workers=min(8, len(wanted))) as pool:
        return list(pool.map(
            lambda job: ensure_host(job[0], images[job[1]], cpuset=cpuset), wanted
        ))


def container_image(name: str) -> str:
    return _out(engine("inspect", "--format", "{{.Config.Image}}", name))


def ensure_host(name: str, image: str, *, tmpfs: Sequence[str] = (),
                cpuset: str | None = None) -> LabHost:
    """Start container ``name`` from ``image`` unless it runs; wait for its sshd.

    ``tmpfs`` and ``cpuset`` apply only when the container is started here (a running one
    is reused as it is)."""
    if is_running(name) and container_image(name) != image:
        # A lab container from an older recipe (or another release): a lab host holds
        # nothing worth keeping, so it is replaced rather than reused stale.
        if name not in container_names(""):
            raise LabError(f"{name} is not a lab container; refusing to replace it")
        engine("rm", "-f", "-t", "2", name)
    if not is_running(name):
        engine("rm", "-f", name, check=False)
        start(name, image, tmpfs=tmpfs, cpuset=cpuset)
    port = published_port(name)
    wait_for_sshd(name, port)
    release = image.rpartition(":")[2]
    return LabHost(name=name, port=port, host_key=read_host_key(name), release=release)


def remove(*names: str) -> None:
    """Remove the named lab containers (only ever ones this lab started)."""
    ours = set(container_names(""))
    mine = [n for n in names if n in ours]
    if mine:
        engine("rm", "-f", "-t", "2", *mine)


def down(prefix: str = PREFIX) -> list[str]:
    """Remove this lab's containers (by label and name) and stop its mirror."""
    names = container_names(prefix)
    if names:
        engine("rm", "-f", "-t", "2", *names)
    mirror.stop_server(state_dir(prefix) / "mirror.pid")
    return names


def status(prefix: str = PREFIX) -> list[tuple[str, str, str]]:
    rows = []
    for name in container_names(prefix):
        running = is_running(name)
        port = str(published_port(name)) if running else "-"
        rows.append((name, "running" if running else "stopped", port))
    return rows


# --- the lab inventory --------------------------------------------------------------------


def start_mirror(prefix: str = PREFIX, version: str = DEFAULT_RSYNC_VERSION) -> int:
    """Fetch the offline rsync tarball and serve it on 127.0.0.1; return the port."""
    tarball = mirror.fetch_debian_orig(version, STATE / "cache")
    root = state_dir(prefix) / "mirror"
    mirror.populate(root, [tarball])
    return mirror.start_server(root, state_dir(prefix) / "mirror.pid")


def write_known_hosts(hosts: list[LabHost], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(h.known_hosts_line + "\n" for h in hosts))


def render_inventory(hosts: list[LabHost], mirror_port: int | None,
                     state: Path, version: str = DEFAULT_RSYNC_VERSION) -> str:
    url = (
        f"http://127.0.0.1:{mirror_port}/{mirror.UPSTREAM_LAYOUT}"
        if mirror_port else f"file://{state}/mirror/{mirror.UPSTREAM_LAYOUT}"
    )
    lines = [
        "# Written by `invoke lab.up`: the lab's containers, pinned host keys, local paths.",
        "defaults:",
        "  admin_user: admin",
        f"  admin_key: {admin_key()}",
        f"  known_hosts: {state}/known_hosts",
        f"  backup_key: {state}/backup_ed25519",
        "  forced_command: daemon",
        "  rsync:",
        f"    version: {version}",
        # The lab builds Debian's byte-identical 3.2.7 offline: older than 3.4.1, so the
        # client needs the switch (a lab server is no threat to this machine).
        f"    allow_vulnerable: {'true' if client_exposure(version) else 'false'}",
        f'    url: "{url}"',
        f'    mirrors: ["file://{state}/mirror/{mirror.UPSTREAM_LAYOUT}"]',
        "    prefix: /usr/local",
        f"    local_prefix: {state}/local",
        "  backup:",
        f'    destination: "{state}/backups/{{name}}"',
        # The lab's state folder is no root meant for backups: allowed here, explicitly.
        f'    allow_destination: "{state}/backups"',
        "    snapshots: 7                  # the default: DEST/latest is the newest run",
        "hosts:",
    ]
    for host in hosts:
        if host.release:
            lines.append(f"  # Debian {host.release}")
        lines += [f"  {host.name}:", "    address: 127.0.0.1", f"    port: {host.port}"]
    return "\n".join(lines) + "\n"


def write_ssh_config(hosts: list[LabHost], path: Path, known_hosts: Path, key: Path) -> None:
    """An ssh_config with strict host key checking, for ssh, rsync -e and testinfra."""
    blocks = [
        f"Host {h.name}\n  HostName 127.0.0.1\n  Port {h.port}\n  User admin\n"
        f"  IdentityFile {key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {known_hosts}\n"
        "  StrictHostKeyChecking yes\n  BatchMode yes\n"
        for h in hosts
    ]
    path.write_text("".join(blocks))


def write_inventory(hosts: list[LabHost], mirror_port: int | None,
                    prefix: str = PREFIX) -> Path:
    state = state_dir(prefix)
    state.mkdir(parents=True, exist_ok=True)
    write_known_hosts(hosts, state / "known_hosts")
    write_ssh_config(hosts, state / "ssh_config", state / "known_hosts", admin_key())
    path = state / "inventory.yaml"
    path.write_text(render_inventory(hosts, mirror_port, state))
    return path
