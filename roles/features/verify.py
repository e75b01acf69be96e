"""verify: run the project's pytest-testinfra checks (``tests/infra``) against the hosts.

``invoke verify`` writes an ssh_config for the selected hosts (the inventory's admin user
and key, host keys checked strictly against the inventory's ``known_hosts`` only), runs

    python -m pytest tests/infra -p no:cacheprovider --hosts=ssh://NAME,...
        --ssh-config=FILE --pullback-inventory=INVENTORY --pullback-results=FILE

as a subprocess, and prints one line per check and host from the results file that
``tests/infra/conftest.py`` writes (the check's name is its docstring's first line).
Without ``--pullback-inventory`` that conftest skips collecting ``tests/infra``, so the
normal test run never tries to reach real servers.

Commands as root go through ``host.sudo()`` in the checks rather than testinfra's global
``--sudo``: sudo resets the environment, and the effective sshd setting must be read for
the backup host's own address (``$SSH_CONNECTION`` of the admin login). sudo has to work
without a password (``sudo_password: true`` hosts are reported as failing).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from roles.core.spec import HostSpec

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "tests" / "infra"
INVENTORY_OPTION = "--pullback-inventory"
RESULTS_OPTION = "--pullback-results"
TIMEOUT = 600.0
STATUSES = ("PASS", "FAIL", "SKIP", "ERROR")


class VerifyError(Exception):
    pass


@dataclass(frozen=True)
class CheckResult:
    host: str
    check: str
    status: str  # PASS | FAIL | SKIP | ERROR
    message: str = ""

    @property
    def failed(self) -> bool:
        return self.status in ("FAIL", "ERROR")


def _value(text: str) -> str:
    if '"' in text or "\n" in text:
        raise VerifyError(f"cannot write {text!r} into an ssh_config")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def render_ssh_config(hosts: list[HostSpec], control_dir: Path | None = None) -> str:
    """One ``Host NAME`` block per host: strict host keys from the inventory only.

    With ``control_dir`` the connections are multiplexed (testinfra adds ControlMaster and
    ControlPersist; the path makes them take effect): one login per host instead of one per
    command. ``stop_masters`` ends them.
    """
    blocks = []
    for h in hosts:
        lines = [
            f"Host {h.name}",
            f"  HostName {h.address}",
            f"  Port {h.port}",
            f"  User {h.admin_user}",
            f"  UserKnownHostsFile {_value(h.known_hosts)}",
            "  GlobalKnownHostsFile /dev/null",
            "  StrictHostKeyChecking yes",
            "  BatchMode yes",
            "  ConnectTimeout 10",
        ]
        if h.admin_key:
            lines += [f"  IdentityFile {_value(h.admin_key)}", "  IdentitiesOnly yes"]
        if control_dir is not None:
            lines.append(f"  ControlPath {_value(str(control_dir))}/%C")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def stop_masters(ssh_config: Path, hosts: list[HostSpec]) -> None:
    """End the multiplexing masters the checks started (each would linger 60 s)."""
    for h in hosts:
        subprocess.run(["ssh", "-F", str(ssh_config), "-O", "exit", h.name],
                       capture_output=True, check=False, timeout=10, stdin=subprocess.DEVNULL)


def pytest_argv(inventory: Path, hosts: list[HostSpec], ssh_config: Path,
                results: Path) -> list[str]:
    return [
        sys.executable, "-m", "pytest", str(INFRA), "-p", "no:cacheprovider",
        "--rootdir", str(ROOT), "-q", "--no-header",
        "--hosts=" + ",".join(f"ssh://{h.name}" for h in hosts),
        f"--ssh-config={ssh_config}",
        f"{INVENTORY_OPTION}={inventory}",
        f"{RESULTS_OPTION}={results}",
    ]


def parse_results(text: str) -> list[CheckResult]:
    """The JSON lines written by tests/infra/conftest.py."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        out.append(CheckResult(record["host"], record["check"], record["status"],
                               record.get("message", "")))
    return out


def run_checks(inventory: Path, hosts: list[HostSpec],
               timeout: float = TIMEOUT) -> list[CheckResult]:
    """Run tests/infra against ``hosts``; one result per check and host, inventory order."""
    results: list[CheckResult] = []
    runnable: list[HostSpec] = []
    for h in hosts:
        if h.sudo_password:
            results.append(CheckResult(h.name, "passwordless sudo for the admin", "FAIL",
                                       "verify runs sudo non-interactively; allow NOPASSWD "
                                       f"for {h.admin_user} or check this host by hand"))
        elif not Path(h.known_hosts).is_file():
            results.append(CheckResult(h.name, "known host key", "FAIL",
                                       f"{h.known_hosts} does not exist (never trusted on "
                                       "first use)"))
        else:
            runnable.append(h)
    if runnable:
        with tempfile.TemporaryDirectory(prefix="pullback-verify-") as tmp:
            ssh_config = Path(tmp) / "ssh_config"
            ssh_config.write_text(render_ssh_config(runnable, Path(tmp)))
            out = Path(tmp) / "results.jsonl"
            argv = pytest_argv(Path(inventory).resolve(), runnable, ssh_config, out)
            try:
                proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                                      timeout=timeout, check=False, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                raise VerifyError(f"the checks did not finish within {timeout:.0f} s") from None
            finally:
                stop_masters(ssh_config, runnable)
            found = parse_results(out.read_text()) if out.exists() else []
        if proc.returncode not in (0, 1) or not found:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            raise VerifyError(f"pytest exited {proc.returncode} without check results:\n"
                              + "\n".join(tail))
        for h in runnable:
            mine = [r for r in found if r.host == h.name]
            if not mine:
                results.append(CheckResult(h.name, "checks ran", "ERROR", "no result for host"))
            elif all(r.status == "ERROR" for r in mine) and len({r.message for r in mine}) == 1:
                # The login failed: one line, not the same error for every check.
                results.append(CheckResult(h.name, "admin login", "ERROR", mine[0].message))
            else:
                results += mine
    order = {h.name: i for i, h in enumerate(hosts)}
    return sorted(results, key=lambda r: order.get(r.host, len(order)))


def format_results(results: list[CheckResult]) -> str:
    width = max((len(r.host) for r in results), default=0)
    lines = []
    for r in results:
        line = f"{r.host:{width}}  {r.status:5} {r.check}"
        if r.failed or r.status == "SKIP":
            line += f": {r.message}" if r.message else ""
        lines.append(line)
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    lines.append(", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n) or "no checks")
    return "\n".join(lines) + "\n"
