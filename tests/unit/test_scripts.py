"""Every POSIX sh script pullback sends to a host is a template (templates/scripts/*.sh.j2):
render each one through the code that sends it, with representative (and awkward) values,
and lint the result with ``shellcheck -s sh``. A template that no case renders is a failure
too, so a new script cannot skip the lint."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from roles.config import gate
from roles.core.hardened import AUTHORIZED_KEYS, GATE, PULLBACK_RSYNCD_CONF, SSHD_CONFIG
from roles.core.render import TEMPLATES, render, shjoin, shquote
from roles.features import doctor
from roles.features import rsync_build as rb
from roles.hostfiles.transaction import (
    FileChange,
    SetupPlan,
    apply_script,
    read_files_script,
    reload_command,
    rollback_script,
)
from roles.remote.facts import gather_script

SCRIPTS = TEMPLATES / "scripts"
AWKWARD = "/opt/it's a \"dir\"/$(id)`x`"  # quotes, spaces, expansions: all must stay data


def full_plan(**overrides: object) -> SetupPlan:
    """A plan that takes every branch of the apply and rollback scripts."""
    changes = (
        FileChange("sshd_config", SSHD_CONFIG, b"PermitRootLogin yes\n",
                   b"PermitRootLogin forced-commands-only\n", 0o644, 0, 0),
        FileChange("authorized_keys", AUTHORIZED_KEYS, None, b"restrict ssh-ed25519 AAAA x\n",
                   0o600, 0, 0, check_line="restrict ssh-ed25519 AAAA x"),
        FileChange("rsyncd.conf", PULLBACK_RSYNCD_CONF, b"[old]\n", None, 0o644, 0, 0),
        FileChange("gate", GATE, b"", b"#!/bin/sh\nexit 1\n", 0o700, 0, 0, check_sh=True),
        FileChange("odd", AWKWARD, b"x", b"y", 0o600, 0, 0),
    )
    values: dict[str, object] = dict(
        host="web1", changes=changes, fix_root_ssh=True, reload_sshd=True,
        client_addr="192.0.2.1", sshd="/usr/sbin/sshd", service=None, pidfile="/run/sshd.pid",
        forced_command=None, create_root_ssh=False, root_ssh_was=(0o755, 0, 0),
        make_dirs=("/usr/local/libexec/pullback", AWKWARD), new_dirs=(AWKWARD,))
    values.update(overrides)
    return SetupPlan(**values)  # type: ignore[arg-type]


class Recorder:
    """A session or local shell that records each command and answers what build_rsync
    needs to go through every step (a real end is exercised in the integration tests)."""

    def __init__(self, sha: str) -> None:
        self.sha = sha
        self.commands: list[str] = []

    def run(self, command: str, *, sudo: bool = False, warn: bool = True) -> object:
        import shlex
        from types import SimpleNamespace

        self.commands.append(command)
        script = shlex.split(command)[-1]
        out = ""
        if "sum=" in script:
            out = f"sum={self.sha}\nncpu=2\n"
        elif script.startswith("mktemp -d"):
            out = "/tmp/pullback-rsync.abcdefgh\n"
        elif "--version 2>&1" in script:
            out = "rsync  version 3.4.1  protocol version 32\nCapabilities:\n    ACLs, xattrs\n"
        return SimpleNamespace(exited=0, stdout=out, stderr="")


def build_scripts() -> list[str]:
    """Every script one build sends (fake answers; the scripts are what is linted)."""
    sha = "0" * 64
    end = Recorder(sha)
    rb.build_rsync(end, "/tmp/pullback-rsync-src.XXXX", "3.4.1", sha, "/opt/pullback-rsync",
                   sudo=True, log=lambda _: None, build_root="/var/tmp/build")
    end.commands.append(rb._sh(render("scripts/rsync_log_tail.sh.j2", lines=30,
                                      log="/var/log/rsync build.log")))
    end.commands.append(rb._sh(render("scripts/rsync_builddir.sh.j2", build_root="")))
    import shlex
    return [shlex.split(c)[-1] for c in end.commands if c.startswith("sh -c ")]


# template -> the scripts that use it, rendered by the code that sends them
CASES: dict[str, Callable[[], list[str]]] = {
    "gather.sh.j2": lambda: [gather_script(["/usr/local/bin/rsync", AWKWARD])],
    "gather_then_stdin.sh.j2": lambda: [gather_script(["/usr/local/bin/rsync"],
                                                      then_stdin=True)],
    "block.sh.j2": lambda: [render("scripts/block.sh.j2", script=apply_script(full_plan()))],
    "apply.sh.j2": lambda: [apply_script(full_plan()),
                            apply_script(full_plan(service="ssh", reload_sshd=False,
                                                   root_ssh_was=None, changes=(),
                                                   make_dirs=()))],
    "rollback.sh.j2": lambda: [rollback_script(full_plan()),
                               rollback_script(full_plan(create_root_ssh=True,
                                                         service="ssh.service"))],
    "reload_sshd.sh.j2": lambda: [reload_command(full_plan()),
                                  reload_command(full_plan(service="ssh"))],
    "read_files.sh.j2": lambda: [read_files_script([GATE, AWKWARD], [AWKWARD], [AWKWARD]),
                                 read_files_script([], [], [])],
    "_probe.sh.j2": lambda: [doctor.admin_probe_script()],
    "doctor_root.sh.j2": lambda: [doctor.root_script(GATE, AWKWARD, [AWKWARD, GATE],
                                                     "2001:db8::1"),
                                  doctor.root_script("", "/usr/bin/rsync", [], "")],
    "doctor_admin.sh.j2": lambda: [doctor.admin_probe_script()],
    "toolchain_probe.sh.j2": lambda: [rb.toolchain_probe()],
    "rsync_read_install.sh.j2": lambda: [render("scripts/rsync_read_install.sh.j2",
                                                stamp=AWKWARD, mark="--pullback-mark--",
                                                binary=AWKWARD + "/bin/rsync")],
    "rsync_install.sh.j2": lambda: [rb._install_script("/tmp/b/stage" + AWKWARD, AWKWARD,
                                                       "/tmp/b/rsync.stamp"),
                                    rb._install_script("/tmp/b/stage", "/", "/tmp/b/s")],
    "rsync_verify.sh.j2": build_scripts,
    "rsync_builddir.sh.j2": build_scripts,
    "rsync_extract.sh.j2": build_scripts,
    "rsync_phase.sh.j2": build_scripts,
    "rsync_log_tail.sh.j2": build_scripts,
    "rsync_version.sh.j2": build_scripts,
    "capture.sh.j2": lambda: [gate.render_capture_script().decode()],
    "gate.sh.j2": lambda: [gate.render_gate(
        "rsync --server --sender -vlogDtprze.iLsfxCIvu . /",
        "rsync --server --sender -vlogDtprze.iLsfxCIvun . /",
        ("/usr/local/bin/rsync", "--server", "--sender", "-vlogDtprze.iLsfxCIvu", ".", "/"),
        ("/usr/local/bin/rsync", "--server", "--sender", "-vlogDtprze.iLsfxCIvun", ".", "/"),
        fingerprint="abc123").decode()],
}


def shellcheck(script: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("shellcheck")
    assert binary, "shellcheck is missing: ./dev setup installs it (APT_PACKAGES)"
    excluded = [
        # Values are single-quoted by shquote on purpose ('$(id)' must stay text), and the
        # scripts pass code to an inner shell in single quotes (sh -c '. "$1"').
        "SC2016",
        # `A && B || fail ...`: fail must run when A or B fails, and it exits; it is the
        # guard the scripts rely on, not a mistaken if-then-else.
        "SC2015",
        # `. /etc/os-release` is the host's file, read there; there is nothing to follow here.
        "SC1091",
    ]
    return subprocess.run([binary, "-s", "sh", "-e", ",".join(excluded), "-"], input=script,
                          capture_output=True, text=True, check=False, timeout=60)


def test_every_script_template_has_a_case():
    assert sorted(p.name for p in SCRIPTS.glob("*.sh.j2")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_rendered_script_passes_shellcheck(name: str):
    scripts = CASES[name]()
    assert scripts
    for script in scripts:
        result = shellcheck(script)
        assert result.returncode == 0, f"{name}:\n{result.stdout}{result.stderr}"
        assert subprocess.run(["sh", "-n"], input=script, text=True, check=False,
                              capture_output=True).returncode == 0


def test_shellcheck_catches_a_bad_script():
    """The lint can fail: an unquoted expansion and a bashism are findings."""
    result = shellcheck('rm -rf $1\nif [[ -n "$x" ]]; then echo; fi\n')
    assert result.returncode != 0 and "SC2086" in result.stdout


@pytest.mark.parametrize("value", ["plain", "", "a b", "it's", "$(id)", "`id`", "a\nb", "*"])
def test_shquote_makes_one_word_that_sh_reads_back(value: str):
    out = subprocess.run(["sh", "-c", f"printf '%s' {shquote(value)}"], capture_output=True,
                         text=True, check=True).stdout
    assert out == value
    joined = subprocess.run(["sh", "-c", f'for w in {shjoin([value, "x"])}; do '
                             "printf '[%s]' \"$w\"; done"], capture_output=True, text=True,
                            check=True).stdout
    assert joined == f"[{value}][x]"


def test_no_script_template_outside_the_scripts_folder():
    assert not [p.name for p in Path(TEMPLATES).glob("*.sh.j2")]
