"""The floor for setup-remote: one OpenSSH login and one ``sudo sh -s`` per host.

What setup-remote could cost at best if it knew each host's state in advance: the
OpenSSH client (not paramiko) logs in once per host and pipes one script to ``sudo sh -s``.

- first run: the very root script setup-remote would apply to that fresh host (its plan,
  computed beforehand with setup-remote's own gather and plan, outside the timing): the
  same files written, validated and renamed, the same sshd check and reload; no fact
  gathering and no lockout check.
- re-run: the fact-gathering script setup-remote runs on a host that needs nothing (a
  no-change run can do no less than read the state once).

bench_setup_remote.py runs it on lab hosts of its own, in the same run as setup-remote.
"""

from __future__ import annotations

import dataclasses
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from roles.core.spec import HostSpec
from roles.hostfiles.plan import daemon_command, plan_setup
from roles.hostfiles.transaction import apply_script
from roles.local.keys import read_public_key
from roles.remote.facts import gather, gather_script
from roles.remote.session import Run


def ssh_argv(host: HostSpec, remote_command: str) -> list[str]:
    """One OpenSSH login as the admin, strict host keys, no config files, no agent."""
    argv = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={host.known_hosts}",
            "-p", str(host.port), "-l", host.admin_user]
    if host.admin_key:
        argv += ["-i", str(host.admin_key)]
    return [*argv, host.address, remote_command]


def first_run_script(host: HostSpec) -> str:
    """The root script setup-remote would apply to ``host`` now (read-only to compute)."""
    with Run().open(host) as session:
        facts = gather(session, [host.rsync.remote_binary])
    forced, _ = daemon_command(facts, host)
    plan = plan_setup(facts, host, read_public_key(host), forced)
    if not plan.changed:
        raise SystemExit(f"{host.name}: not a fresh host, the floor has nothing to apply")
    return apply_script(dataclasses.replace(plan))


@dataclasses.dataclass(frozen=True)
class Job:
    host: HostSpec
    command: str  # the remote command line
    script: str   # its standard input


def first_run_jobs(hosts: list[HostSpec]) -> list[Job]:
    return [Job(h, "sudo -n sh -s", first_run_script(h)) for h in hosts]


def rerun_jobs(hosts: list[HostSpec]) -> list[Job]:
    # "$SSH_CONNECTION" is expanded by the admin's login shell, as setup-remote's gather does.
    script = gather_script([hosts[0].rsync.remote_binary])
    return [Job(h, 'sudo -n sh -s "$SSH_CONNECTION" ""', script) for h in hosts]


def run_one(job: Job) -> None:
    result = subprocess.run(ssh_argv(job.host, job.command), input=job.script.encode(),
                            capture_output=True, check=False, timeout=120)
    out = result.stdout.decode(errors="replace")
    if result.returncode != 0 or not ("PULLBACK_OK" in out or out.rstrip().endswith("END")):
        raise SystemExit(f"floor: {job.host.name}: exit {result.returncode}: "
                         f"{result.stderr.decode(errors='replace').strip()[-300:]}")


def run(jobs: list[Job], parallel: int = 32) -> None:
    """Every job at once (as setup-remote runs its fleet: up to 32 hosts in parallel)."""
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(jobs)))) as pool:
        list(pool.map(run_one, jobs))


if __name__ == "__main__":
    raise SystemExit(f"run {Path(__file__).with_name('bench_setup_remote.py')}: it measures "
                     "the floor and setup-remote side by side")
