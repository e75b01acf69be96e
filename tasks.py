"""pullback: pull-based full-system rsync backups over a restricted root SSH key.

Tasks stay thin: parse options, load the inventory, call the roles, print the outcome per
host. ``invoke --list`` shows them; ``invoke --help TASK`` shows a task's options.

Each task imports its feature inside its body, on purpose: invoke loads this whole file for
every task, and ``invoke backup`` (like ``pullback-backup``) must not pay for Fabric,
paramiko, PyYAML or pydantic (about 60 ms) when it needs none of them.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from invoke import Collection, Program
from invoke import task as invoke_task
from invoke.exceptions import Exit

from roles.cli.program import PullbackTask, exit_2_on_parse_errors
from roles.core.hardened import Mode
from roles.core.outcome import Outcome, Trust
from roles.inventory.selection import Inventory, InventoryError

DEFAULT_INVENTORY = "inventory.yaml"


def task(*args, **kwargs):
    """invoke's ``@task`` with pullback's short flags only (``roles.cli.program``)."""
    return invoke_task(*args, auto_shortflags=False, klass=PullbackTask, **kwargs)


exit_2_on_parse_errors(Program)


def _command(task_name: str, host: str, inventory: str) -> str:
    """The command line to run next for one host, as this program is called."""
    program = "pullback" if Path(sys.argv[0]).name == "pullback" else "invoke"
    return shlex.join([program, task_name, "--inventory", inventory, "--host", host])


def _failure(host: str, message: str, inventory: str, task_name: str | None = None) -> str:
    """One line for a failed host: the reason (classified when ssh failed, the host's name
    and errno brackets dropped) and the command to run next."""
    from roles.core.ssh_failures import classify_ssh_failure, clean_message

    reason = clean_message(message, host)
    failure = classify_ssh_failure(reason)
    if failure is not None and failure.meaning not in reason:
        reason = f"{reason} -- {failure.meaning}"
    nxt = task_name or (failure.task if failure else "doctor")
    return f"{reason}; next: {_command(nxt, host, inventory)}"


def _error_of(exc: Exception) -> str:
    """An exception as a reason: pullback's own errors are their message; anything else
    keeps its type, which names the bug."""
    if type(exc).__module__.startswith("roles."):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _no_prompt_for_sudo(task_name: str, hosts) -> None:
    """``sudo_password: true`` asks on the terminal; without one getpass dies with EOFError
    after the run started. Refuse before any connection instead."""
    if sys.stdin.isatty():
        return
    asking = [h.name for h in hosts if h.sudo_password]
    if asking:
        raise Exit(f"{task_name}: sudo_password: true for {', '.join(asking)}, and there is "
                   "no terminal to ask for it on: run it from a terminal, or allow NOPASSWD "
                   "sudo for the admin user", code=2)


HOST_HELP = {
    "inventory": "inventory file (default: inventory.yaml)",
    "host": "host name from the inventory; repeat for several (default: every host)",
}
FLEET_HELP = {
    **HOST_HELP,
    "shard": "K/N: only the hosts of shard K of N (several backup hosts split one inventory)",
}


def _inventory(path: str, loader=None) -> Inventory:
    """The validated inventory (``roles.inventory.schema``, imported here: pydantic is heavy), or
    exit 2 with one line per problem."""
    if loader is None:
        from roles.inventory.schema import load as loader
    try:
        return loader(path)
    except InventoryError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise Exit(code=2) from None


def _bare_host_flag(argv: list[str]) -> bool:
    """``--host`` given with no name after it. invoke reads it as an empty list, the same
    as no ``--host`` at all: every host. A flag meant to narrow a run must not widen it."""
    for i, word in enumerate(argv):
        if word == "--host" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            return True
    return False


def _hosts(path: str, names: list[str] | None, shard: str | None = None, loader=None):
    if _bare_host_flag(sys.argv):
        raise Exit("--host needs a host name (repeat it for several; leave it out for every "
                   "host)", code=2)
    try:
        return _inventory(path, loader).choose(names, shard)
    except InventoryError as exc:
        raise Exit(str(exc), code=2) from None


@task(iterable=["host"], help={**HOST_HELP, "passphrase": "protect the key with a passphrase "
                                "(ssh-keygen prompts; it is never stored)"})
def keygen(c, inventory=DEFAULT_INVENTORY, host=None, passphrase=False):
    """Create the backup key (ed25519, 0600) and the local backup folders (0700)."""
    if passphrase and not sys.stdin.isatty():
        raise Exit("keygen: --passphrase needs a terminal: ssh-keygen asks for it there",
                   code=2)
    from roles.local import folders, keys

    hosts = _hosts(inventory, host)
    try:
        for h in hosts:  # before anything is created
            folders.check_folder(h.destination.rstrip("/"))
        for path in dict.fromkeys(Path(h.backup_key) for h in hosts):
            print(keys.ensure_backup_key(path, passphrase=passphrase))
        for h in hosts:
            print(keys.ensure_destination(Path(h.destination)))
    except folders.FolderError as exc:
        raise Exit(f"keygen: refused: {exc}", code=1) from None
    except (keys.KeyFileError, OSError) as exc:
        raise Exit(f"keygen: {exc}", code=1) from None


def _report(outcomes, task_name: str, inventory: str) -> None:
    """Print per host and step: ok, changed or failed (one line: why, and what to run
    next); exit 1 if any host failed."""
    for outcome in outcomes:
        for diff in outcome.diffs:
            print(diff, end="")
        for warning in outcome.warnings:
            print(f"{outcome.host}: warning: {warning}", file=sys.stderr)
        for step, state in outcome.steps.items():
            print(f"{outcome.host:24} {step:18} {state}")
        for action in outcome.actions:
            print(f"{outcome.host:24} {'action':18} {action}")
        if outcome.error:
            print(f"{outcome.host:24} {'':18} failed: "
                  f"{_failure(outcome.host, outcome.error, inventory)}")
    failed = [o.host for o in outcomes if o.error]
    if failed:
        raise Exit(f"{task_name}: {_of(failed, outcomes)} failed", code=1)


def _of(failed: list, every: list) -> str:
    return f"{len(failed)} of {len(every)} host{'s' * (len(every) != 1)}"


@task(iterable=["host"], help={**FLEET_HELP, "dry_run": "print the diffs, change nothing"})
def setup_remote(c, inventory=DEFAULT_INVENTORY, host=None, shard=None, dry_run=False):
    """Harden each remote: PermitRootLogin, restricted root key, rsyncd.conf."""
    from roles.core import fleet
    from roles.features import setup_remote as setup
    from roles.remote.session import Run

    hosts = _hosts(inventory, host, shard)
    _no_prompt_for_sudo("setup-remote", hosts)
    sessions = Run()  # one sudo question per admin user for the whole fleet
    outcomes = fleet.for_each(
        hosts,
        lambda h: setup.setup_host(h, dry_run=dry_run, sessions=sessions),
        lambda h, exc: Outcome(h.name, {}, error=_error_of(exc)),
        parallel=32,
    )
    _report(outcomes, "setup-remote", inventory)


@task(iterable=["host"], help={
    **FLEET_HELP,
    "version": "build this version instead of the inventory's rsync.version",
    "local_only": "build only on this machine",
    "remote_only": "build only on the hosts",
    "check": "run rsync's `make check` after make",
    "no_install_packages": "never install compiler packages; print the command instead",
    "require_signature": "fail unless upstream's .asc signature is checked and good "
                         "(needs gpg and rsync.gpg_keyring)",
    "dry_run": "say what each end would get; fetch, build and change nothing",
})
def build_rsync(c, inventory=DEFAULT_INVENTORY, host=None, shard=None, version=None,
                local_only=False, remote_only=False, check=False, no_install_packages=False,
                require_signature=False, dry_run=False):
    """Build the pinned rsync from verified source on both ends, in parallel."""
    from roles.core.ssh_failures import classify_ssh_failure
    from roles.features import rsync_build
    from roles.local.state import DOWNLOADS

    if local_only and remote_only:
        raise Exit("build-rsync: --local-only and --remote-only exclude each other", code=2)
    if version is not None:
        try:
            rsync_build.validate_version(version)
        except ValueError as exc:
            raise Exit(f"build-rsync: {exc}", code=2) from None
    hosts = _hosts(inventory, host, shard)
    if not local_only and not dry_run:
        _no_prompt_for_sudo("build-rsync", hosts)
    # A client backup would refuse to run is not built at all: an inventory problem, exit 2.
    refusals = [] if remote_only else rsync_build.client_build_refusals(hosts, version)
    if refusals:
        raise Exit("\n".join(f"build-rsync: {r}" for r in refusals), code=2)
    results = rsync_build.build_everywhere(
        hosts, version=version, local=not remote_only, remote=not local_only, check=check,
        install_packages=not no_install_packages, cache_dir=DOWNLOADS,
        require_signature=require_signature, dry_run=dry_run,
    )
    for r in results:
        end = "local" if r.end.startswith("local:") else r.end
        if r.error and end != "local" and classify_ssh_failure(r.error):
            print(f"{end:24} failed: {_failure(end, r.error, inventory)}")
        elif r.error:  # a build failure names its own fix
            print(f"{end:24} failed: {r.error}")
        elif r.plan:
            print(f"{end:24} {r.plan.describe()}")
        elif r.result:
            print(f"{end:24} {r.result.state:6} {r.result.version_line}")
    failed = [r for r in results if r.error]
    if failed:
        raise Exit(f"build-rsync: {len(failed)} of {len(results)} ends failed", code=1)


@task(iterable=["host"], help=FLEET_HELP)
def capture_command(c, inventory=DEFAULT_INVENTORY, host=None, shard=None):
    """Capture the exact command the client's rsync sends and force exactly that."""
    from roles.core import fleet
    from roles.features import capture
    from roles.remote.session import Run

    hosts = _hosts(inventory, host, shard)
    if not any(h.forced_command == Mode.CAPTURED for h in hosts):
        raise Exit("capture-command: no selected host has forced_command: captured", code=2)
    _no_prompt_for_sudo("capture-command", hosts)
    sessions = Run()  # one sudo question per admin user for the whole fleet
    outcomes = fleet.for_each(
        hosts, lambda h: capture.capture_host(h, sessions),
        lambda h, exc: Outcome(h.name, {}, error=_error_of(exc)),
        parallel=16,
    )
    _report(outcomes, "capture-command", inventory)


@task(iterable=["host"], help={**FLEET_HELP, "dry_run": "rsync -n: show what would change"})
def backup(c, inventory=DEFAULT_INVENTORY, host=None, shard=None, dry_run=False):
    """Pull / from each host with the backup key (unattended)."""
    from roles.cli.progress import view_for
    from roles.features import backup as pulls
    from roles.inventory import compiled

    # The compiled inventory: validated once, then read from the cache (roles.inventory.compiled).
    hosts = _hosts(inventory, host, shard, loader=compiled.load)
    # A live line per host on a terminal, a start and an end line per host otherwise.
    view = view_for([h.name for h in hosts], sys.stdout, sys.stderr)
    bad = pulls.pull_all(hosts, dry_run=dry_run, watch=view,
                         next_step=lambda name, task_name: _command(task_name, name, inventory))
    if bad:
        raise Exit(f"backup: {_of(bad, hosts)} failed", code=1)


@task(iterable=["host"], help={
    **HOST_HELP,
    "host": "the host whose backup to restore from (exactly one)",
    "path": "absolute path on the server to restore, e.g. /etc/ssh",
    "to": "local folder to restore into, made 0700: the copy lands in TO/tree (a folder's "
          "contents, or the file)",
    "snapshot": "snapshot name as `invoke snapshots` lists it (default: the newest)",
    "force": "copy into a non-empty folder (nothing there is deleted)",
})
def restore(c, inventory=DEFAULT_INVENTORY, host=None, path=None, to=None, snapshot=None,
            force=False):
    """Copy a path out of a local backup, metadata preserved."""
    from roles.core.errors import PullbackError
    from roles.features import restore as restores

    if len(host or []) != 1:
        raise Exit("restore: name exactly one --host (a restore copies from one host's "
                   "backup)", code=2)
    if not path or not to:
        raise Exit("restore: --path and --to are required", code=2)
    (h,) = _hosts(inventory, host)
    try:
        result = restores.run_restore(h, path=path, to=to, snapshot=snapshot, force=force)
    except PullbackError as exc:  # bad input exits 2, a held lock or unusable folder 1
        raise Exit(f"restore: {exc}", code=exc.exit_code) from None
    if result.warning:
        print(f"{h.name}: warning: {result.warning}", file=sys.stderr)
    if not result.ok:
        print(result.output, end="", file=sys.stderr)
        raise Exit(f"restore: {result.error}", code=1)
    print(f"{h.name}: restored {path} from {result.source} into {result.target}")


@task(iterable=["host"], help={
    **HOST_HELP,
    "host": "the host to drill (exactly one)",
    "to": "new or empty local folder (made 0700) the restore goes into: TO/tree",
    "path": "server path to drill (default: backup.source); a quiet one such as /etc",
    "force": "restore into a non-empty TO/tree",
})
def restore_drill(c, inventory=DEFAULT_INVENTORY, host=None, to=None, path=None, force=False):
    """Back up a host, restore it into a fresh folder, compare with the server: 0 differences."""
    from roles.cli import drill
    from roles.core.drill import format_table
    from roles.core.errors import PullbackError
    from roles.remote.session import ConnectError

    if len(host or []) != 1 or not to:
        raise Exit("restore-drill: name exactly one --host and --to", code=2)
    (h,) = _hosts(inventory, host)
    _no_prompt_for_sudo("restore-drill", [h])
    try:
        result = drill.run_drill(h, to=to, path=path, force=force)
    except (PullbackError, ConnectError) as exc:
        raise Exit(f"restore-drill: {exc}", code=getattr(exc, "exit_code", 1)) from None
    for warning in result.warnings:
        print(f"{h.name}: warning: {warning}", file=sys.stderr)
    print(f"{h.name}: {result.path} on the server against its restore in {result.target}")
    print(format_table(result.comparison), end="")
    if result.comparison.excluded:
        print(f"({result.comparison.excluded} server entries left out by backup.exclude "
              "and backup.system_exclude)")
    if not result.ok:
        raise Exit(f"restore-drill: {result.comparison.differences} differences", code=1)


@task(iterable=["host"], help={**FLEET_HELP, "explain": "explain a pasted rsync error "
                                "message or exit code; no host is contacted"})
def doctor(c, inventory=DEFAULT_INVENTORY, host=None, shard=None, explain=None):
    """Diagnose why a backup fails: host key, shell, rsync, sshd, forced command, test pull."""
    from roles.features import doctor as diagnosis

    if explain is not None:
        print(diagnosis.explain_rsync_error(explain))
        return
    hosts = _hosts(inventory, host, shard)
    _no_prompt_for_sudo("doctor", hosts)
    reports = diagnosis.diagnose_all(hosts)
    for report in reports:
        print(diagnosis.format_report(report))
    bad = [r.host for r in reports if r.errors]
    if bad:
        raise Exit(f"doctor: errors on {_of(bad, reports)}", code=1)


@task(iterable=["host"], help=FLEET_HELP)
def check_inventory(c, inventory=DEFAULT_INVENTORY, host=None, shard=None):
    """Check the inventory, keys, known_hosts, folders and rsync here; contact no host."""
    from roles.cli import check

    results = [check.check_host(h) for h in _hosts(inventory, host, shard)]
    for r in results:
        for warning in r.warnings:
            print(f"{r.host}: warning: {warning}", file=sys.stderr)
        for problem in r.problems:
            print(f"{r.host}: {problem}")
    if any(r.problems for r in results):
        raise Exit(code=2)
    print("ok")


@task(iterable=["host"], help=FLEET_HELP)
def verify(c, inventory=DEFAULT_INVENTORY, host=None, shard=None):
    """Check each remote's hardened state with the testinfra checks (tests/infra)."""
    from roles.features import verify as checks

    hosts = _hosts(inventory, host, shard)
    try:
        results = checks.run_checks(Path(inventory), hosts)
    except checks.VerifyError as exc:
        raise Exit(f"verify: {exc}", code=1) from None
    print(checks.format_results(results), end="")
    bad = sorted({r.host for r in results if r.failed})
    if bad:
        raise Exit(f"verify: failed: {', '.join(bad)}", code=1)


@task(iterable=["host"], help={
    **FLEET_HELP,
    "host": "host to back up; repeat for several (default: every host of the inventory at "
            "run time)",
    "at": "daily start, HH:MM 24-hour (default 02:30); systemd adds up to 30 min at random, "
          "cron/launchd a fixed offset",
    "remove": "remove the schedule (only files marked 'managed by pullback')",
    "dry_run": "print the files and their paths, write nothing",
    "user": "a schedule for this user (systemd --user, crontab, LaunchAgents)",
    "kind": "systemd, cron or launchd (default: the one running here)",
    "agent_socket": "SSH_AUTH_SOCK for the runs: an ssh-agent holding a passphrase key",
})
def schedule(c, inventory=DEFAULT_INVENTORY, host=None, shard=None, at="02:30", remove=False,
             dry_run=False, user=False, kind=None, agent_socket=None):
    """Run the backup daily: systemd timer, cron entry or launchd job on this machine."""
    from roles.features import schedule as sched

    try:
        if remove:
            plan = sched.plan_remove(sched.gather(user=user), user=user)
        else:
            sched.parse_at(at)
            hosts = _hosts(inventory, host, shard)
            job = sched.build_job(
                inventory, [h.name for h in hosts] if host else [], at=at,
                agent_socket=agent_socket, shard=shard,
                own_units=[h.name for h in hosts if h.backup.own_unit],
                shared=any(not h.backup.own_unit for h in hosts),
                write_paths=sched.destination_roots(hosts),
                bwrap=any(h.backup.sandbox for h in hosts))
            if not Path(job.argv[0]).is_file():
                raise Exit(f"schedule: {job.argv[0]} not found: install the project into "
                           "its venv (`./dev setup`) and run from it", code=2)
            keys = sched.check_keys([h.backup_key for h in hosts], agent_socket=agent_socket)
            for warning in keys.warnings:
                print(f"schedule: warning: {warning}", file=sys.stderr)
            if keys.problems:
                raise Exit("\n".join(f"schedule: {p}" for p in keys.problems), code=1)
            plan = sched.plan_install(sched.gather(user=user), job, kind=kind, user=user)
    except sched.ScheduleError as exc:
        raise Exit(f"schedule: {exc}", code=2) from None
    if plan.problems:
        raise Exit("\n".join(f"schedule: {p}" for p in plan.problems), code=1)
    try:
        lines = sched.describe(plan, dry_run=True) if dry_run else sched.apply_schedule(plan)
    except sched.ApplyError as exc:
        raise Exit(f"schedule: {exc}", code=1) from None
    print("\n".join(lines))


@task(iterable=["host"], help={**FLEET_HELP, "json": "print JSON (keys in docs/tasks.md) "
                                "instead of the table; the exit code is the same"})
def status(c, inventory=DEFAULT_INVENTORY, host=None, shard=None, json=False):
    """Last run, result and age of the newest good backup per host; exit 1 if stale."""
    from datetime import UTC, datetime

    from roles.features import status as report

    now = datetime.now(UTC)
    statuses = [report.gather_status(h, now) for h in _hosts(inventory, host, shard)]
    if json:
        import json as json_text

        print(json_text.dumps(report.status_json(statuses, now), indent=2))
        stale = [s.host for s in statuses if s.stale]
        if stale:
            raise Exit(code=1)
        return
    for s in statuses:
        for problem in s.problems:
            print(f"{s.host}: warning: {problem}", file=sys.stderr)
    if shard:
        from roles.core.shards import parse_shard, shard_of
        from roles.local.store import state_dir

        k, n = parse_shard(shard)
        for h in _inventory(inventory).select(host):
            owner = shard_of(h.name, n)
            if owner != k and state_dir(h).exists():
                print(report.moved_note(h.name, h.destination.rstrip("/"), (k, n), owner),
                      file=sys.stderr)
    print(report.format_table(statuses), end="")
    stale = [s.host for s in statuses if s.stale]
    if stale:
        raise Exit(f"status: no good backup within backup.max_age: {', '.join(stale)}", code=1)


def _one_host(task_name: str, inventory: str, host: list[str] | None):
    if len(host or []) != 1:
        raise Exit(f"{task_name}: name exactly one --host", code=2)
    (h,) = _hosts(inventory, host)
    return h


@task(iterable=["host"], help={**HOST_HELP, "host": "the host (exactly one)",
                                "json": "print JSON instead of the table"})
def snapshots(c, inventory=DEFAULT_INVENTORY, host=None, json=False):
    """List a host's snapshots: time, files, size, complete or partial."""
    from roles.core.table import format_rows
    from roles.features import snapshots as snaps

    h = _one_host("snapshots", inventory, host)
    found = snaps.list_snapshots(h)
    if json:
        import dataclasses
        import json as json_text

        print(json_text.dumps({"host": h.name, "snapshots": [dataclasses.asdict(s)
                                                             for s in found]}, indent=2))
        return
    if not found:
        print(f"{h.name}: no backup yet in {h.destination}")
        return
    print(format_rows(snaps.snapshot_rows(found)), end="")


@task(iterable=["host"], help={
    **HOST_HELP, "host": "the host (exactly one)",
    "old": "snapshot to compare from (default: the newest)",
    "new": "snapshot to compare to (default: the live server, a dry-run pull)",
})
def diff(c, inventory=DEFAULT_INVENTORY, host=None, old=None, new=None):
    """Files added, removed and changed between two snapshots, or a snapshot and the server."""
    from roles.core.errors import PullbackError
    from roles.features import snapshots as snaps

    h = _one_host("diff", inventory, host)
    if new and not old:
        raise Exit("diff: --new needs --old (without --new: --old against the server)",
                   code=2)
    try:
        result = snaps.diff_snapshots(h, old, new) if old and new else snaps.diff_live(h, old)
    except PullbackError as exc:
        raise Exit(f"diff: {exc}", code=exc.exit_code) from None
    print(snaps.format_diff(result), end="")


@task(iterable=["host"], help={**FLEET_HELP, "dry_run": "name what would go, remove nothing"})
def prune(c, inventory=DEFAULT_INVENTORY, host=None, shard=None, dry_run=False):
    """Remove the snapshots backup.snapshots and backup.retain no longer keep (under the lock)."""
    from roles.core.errors import PullbackError
    from roles.features import snapshots as snaps

    failed = []
    for h in _hosts(inventory, host, shard):
        if not h.backup.snapshots:
            print(f"{h.name}: one mirror (backup.snapshots: 0): nothing to prune")
            continue
        try:
            kept, removed, warnings = snaps.prune(h, dry_run=dry_run)
        except PullbackError as exc:
            print(f"{h.name}: failed: {exc}", file=sys.stderr)
            failed.append(h.name)
            continue
        for warning in warnings:
            print(f"{h.name}: warning: {warning}", file=sys.stderr)
        verb = "would remove" if dry_run else "removed"
        print(f"{h.name}: kept {len(kept)}, {verb} {len(removed)}"
              + (f": {', '.join(removed)}" if removed else ""))
    if failed:
        raise Exit(f"prune: failed: {', '.join(failed)}", code=1)


@task(iterable=["host"], help={
    **HOST_HELP,
    "host": "host whose key to trust (required; repeat for several)",
    "yes": "trust without asking (check the fingerprint some other way first)",
})
def trust_host(c, inventory=DEFAULT_INVENTORY, host=None, yes=False):
    """Show a host's SSH key fingerprint; pin it in known_hosts once confirmed."""
    from roles.core.ssh_failures import classify_ssh_failure
    from roles.features import trust

    if not host:
        raise Exit("trust-host: name the host(s) with --host", code=2)
    hosts = _hosts(inventory, host)

    def confirm(question: str) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            raise trust.TrustError("no terminal to confirm on: check the fingerprint, then "
                                   "run again with --yes")
        return input(question).strip().lower() in ("y", "yes")

    failed = []
    for h in hosts:
        try:
            outcome = trust.trust_host(h, confirm)
        except trust.HostKeyError as exc:  # TrustError too: it is one
            reason = str(exc)
            if classify_ssh_failure(reason):  # no sshd there: doctor says more
                reason = _failure(h.name, reason, inventory, "doctor")
            print(f"{h.name}: {Trust.REFUSED}: {reason}", file=sys.stderr)
            failed.append(h.name)
            continue
        print(f"{h.name}: {outcome.state}: {outcome.name} {outcome.key.type} "
              f"{outcome.key.fingerprint} ({outcome.known_hosts})")
        if outcome.state == Trust.DECLINED:
            failed.append(h.name)
    if failed:
        raise Exit(f"trust-host: not trusted: {', '.join(failed)}", code=1)


# --- the lab --------------------------------------------------------------------------------


LAB_HELP = {"prefix": "container name prefix (default pullback-lab)"}


def _shown(path: Path) -> str:
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


@task(help={**LAB_HELP, "count": "number of containers (default 1; per release with --os)",
            "release": "Debian release of the image (default bookworm)",
            "os": "comma-separated Debian releases, one container each named after it "
                  "(e.g. bullseye,bookworm,trixie)",
            "systemd": "systemd as PID 1, running sshd as ssh.service (as on a server)"})
def lab_up(c, count=1, release="bookworm", prefix="pullback-lab", os="", systemd=False):
    """Start lab containers playing remote servers; write .state/lab/inventory.yaml."""
    from lab import hosts as lab

    try:
        releases = lab.parse_releases(os) if os else None
        hosts = lab.up(count=int(count), prefix=prefix, release=release, releases=releases,
                       systemd=systemd)
        port = lab.start_mirror(prefix)
        path = lab.write_inventory(hosts, port, prefix)
    except (lab.LabError, lab.mirror.MirrorError) as exc:
        raise Exit(f"lab.up: {exc}", code=1) from None
    for h in hosts:
        print(f"{h.name}: ssh -F {_shown(path.parent / 'ssh_config')} {h.name}")
    print(f"rsync mirror: http://127.0.0.1:{port}/")
    print(f"inventory: {_shown(path)}")


@task(help=LAB_HELP)
def lab_down(c, prefix="pullback-lab"):
    """Remove the lab's containers and stop its mirror."""
    from lab import hosts as lab

    try:
        names = lab.down(prefix)
    except lab.LabError as exc:
        raise Exit(f"lab.down: {exc}", code=1) from None
    print("removed: " + (", ".join(names) if names else "nothing"))


@task(help=LAB_HELP)
def lab_status(c, prefix="pullback-lab"):
    """Show the lab's containers and their ssh ports."""
    from lab import hosts as lab

    rows = lab.status(prefix)
    if not rows:
        print("no lab containers")
    for name, state, port in rows:
        print(f"{name:24} {state:8} {port}")


ns = Collection(
    keygen, setup_remote, build_rsync, capture_command, backup, restore, restore_drill,
    doctor, verify,
    schedule, status, trust_host, snapshots, diff, prune, check_inventory,
)
lab_collection = Collection("lab")
lab_collection.add_task(lab_up, "up")
lab_collection.add_task(lab_down, "down")
lab_collection.add_task(lab_status, "status")
ns.add_collection(lab_collection)
