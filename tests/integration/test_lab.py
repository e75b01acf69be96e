"""The lab itself: containers start, the admin logs in strictly, sudo works, teardown."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab import hosts as lab
from roles.inventory.schema import load
from roles.remote.session import ConnectError, connect
from tests.integration.conftest import PREFIX, Lab, infra_host

pytestmark = pytest.mark.integration


def test_admin_logs_in_with_key_and_pinned_host_key(lab_env: Lab, shared_host: lab.LabHost):
    host = load(lab_env.inventory([shared_host])).hosts[shared_host.name]
    conn = connect(host)
    try:
        assert conn.run("id -un").stdout.strip() == "admin"
        assert conn.run("id -u", sudo=True).stdout.strip() == "0"
    finally:
        conn.close()


def test_openssh_client_agrees_on_the_pinned_host_key(lab_env: Lab, shared_host: lab.LabHost):
    config = lab_env.ssh_config([shared_host])
    result = subprocess.run(
        ["ssh", "-F", str(config), shared_host.name, "sudo", "-n", "true"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # a clean shell: the admin login prints nothing


def test_unknown_host_key_is_refused(lab_env: Lab, shared_host: lab.LabHost, tmp_path):
    inventory = lab_env.inventory([shared_host])
    host = load(inventory).hosts[shared_host.name]
    # Same port, but a known_hosts that pins a different key: must be refused.
    other = lab.LabHost(shared_host.name, shared_host.port,
                        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDt0cDPZ8k7J0zn1kqQz1Z7fI9vqgTuE5H8g9fYlH6zC")
    lab.write_known_hosts([other], tmp_path / "known_hosts")
    changed = dataclasses.replace(host, **{"known_hosts": str(tmp_path / "known_hosts")})
    with pytest.raises(ConnectError, match="HOST KEY CHANGED"):
        connect(changed)
    (tmp_path / "empty").write_text("")
    unknown = dataclasses.replace(host, **{"known_hosts": str(tmp_path / "empty")})
    with pytest.raises(ConnectError, match="not in"):
        connect(unknown)


def test_testinfra_reaches_the_lab_host(lab_env: Lab, shared_host: lab.LabHost):
    host = infra_host(lab_env, shared_host)
    assert host.user().name == "root"  # through sudo
    sshd = host.file("/usr/sbin/sshd")
    assert sshd.exists and sshd.user == "root"
    assert host.process.filter(comm="sshd")
    assert host.package("openssh-server").is_installed
    assert host.exists("gcc") and host.exists("make")


def test_lab_down_leaves_nothing_running(lab_env: Lab):
    host = lab_env.start("down")
    assert lab.is_running(host.name)
    lab_env.remove(host)
    assert host.name not in lab.container_names("")
    assert not lab.is_running(host.name)


def test_invoke_lab_up_status_down(tmp_path):
    prefix = "pullback-test-cli"
    invoke = [str(Path(sys.executable).parent / "invoke")]
    try:
        up = subprocess.run([*invoke, "lab.up", "--prefix", prefix, "--count", "2"],
                            capture_output=True, text=True, timeout=300, check=False)
        assert up.returncode == 0, up.stderr
        assert lab.container_names(prefix) == [f"{prefix}-1", f"{prefix}-2"]
        inventory = load(lab.state_dir(prefix) / "inventory.yaml")
        assert sorted(inventory.hosts) == [f"{prefix}-1", f"{prefix}-2"]
        conn = connect(inventory.hosts[f"{prefix}-2"])
        assert conn.run("hostname").stdout.strip() == f"{prefix}-2"
        conn.close()
        status = subprocess.run([*invoke, "lab.status", "--prefix", prefix],
                                capture_output=True, text=True, timeout=60, check=True)
        assert status.stdout.count("running") == 2
    finally:
        down = subprocess.run([*invoke, "lab.down", "--prefix", prefix],
                              capture_output=True, text=True, timeout=120, check=False)
    assert down.returncode == 0, down.stderr
    assert lab.container_names(prefix) == []
    assert lab.mirror.server_port(lab.state_dir(prefix) / "mirror.pid") is None


def test_a_container_from_an_older_image_is_replaced(lab_env: Lab):
    other = lab.build_images(compiler=False)  # another image: the "bare" one
    host = lab_env.start("stale", image=other)
    assert lab.container_image(host.name) == other
    again = lab.ensure_host(host.name, lab_env.image)
    assert lab.container_image(host.name) == lab_env.image
    assert lab.is_running(host.name) and again.host_key != host.host_key  # a new container


def test_cpuset_gives_a_container_cpus_of_its_own(lab_env: Lab):
    # The build benchmark's "two machines" layout: the lab host sees only its CPUs, and
    # build_rsync's make -j follows nproc on that end.
    cpu = str(min(os.sched_getaffinity(0)))  # one CPU this machine lets us use
    name = f"{PREFIX}-{os.getpid()}-cpuset"
    lab_env.started.append(name)
    host = lab.ensure_host(name, lab_env.image, cpuset=cpu)
    try:
        inspected = lab.engine("inspect", "--format", "{{.HostConfig.CpusetCpus}}", name)
        assert inspected.stdout.decode().strip() == cpu
        conn = connect(load(lab_env.inventory([host])).hosts[name])
        try:
            out = conn.run("nproc; grep Cpus_allowed_list /proc/self/status").stdout.split()
            assert out == ["1", "Cpus_allowed_list:", cpu]
        finally:
            conn.close()
    finally:
        lab_env.remove(host)


@pytest.mark.parametrize("cpuset", ["", "1;true", "0-", "a", "0, 1", "--cpus=2"])
def test_a_malformed_cpuset_is_refused_before_the_engine_runs(cpuset: str):
    with pytest.raises(lab.LabError, match="cpuset wants CPU numbers"):
        lab.start(f"{PREFIX}-never-started", "localhost/no-such-image", cpuset=cpuset)
