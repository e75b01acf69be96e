"""The plan of a hardened host, pure: from the host's facts and the inventory to the root
files that must change (sshd_config, authorized_keys, pullback's rsyncd.conf, the old
module in /etc/rsyncd.conf, captured mode's scripts) in a safe order. setup-remote and
capture-command apply it with ``roles.hostfiles.transaction``; the wanted state itself is
``roles.core.hardened``."""

from __future__ import annotations

import dataclasses
import posixpath
from typing import TYPE_CHECKING

from roles.config import rootkey, rsyncd, sshd
from roles.core import hardened, platforms
from roles.core.hardened import (
    AUTHORIZED_KEYS,
    PERMIT_ROOT_LOGIN,
    PRIVATE,
    PULLBACK_DIR,
    PULLBACK_RSYNCD_CONF,
    ROOT_SSH,
    RSYNCD_CONF,
    SSHD_CONFIG,
    HelperFile,
    Mode,
)
from roles.core.outcome import State
from roles.core.spec import HostSpec
from roles.hostfiles.transaction import FileChange, SetupError, SetupPlan

if TYPE_CHECKING:
    from roles.remote.facts import HostFacts


def daemon_command(facts: HostFacts, host: HostSpec) -> tuple[str, list[str]]:
    """The daemon-mode forced command and warnings: the pinned build when it is there."""
    rsync, warning = hardened.forced_rsync(host.rsync.remote_binary, facts.rsync)
    if rsync is None:
        raise SetupError(f"no rsync on the host: neither {host.rsync.remote_binary} nor one "
                         "on PATH; run `invoke build-rsync`")
    return hardened.daemon_command(rsync), [warning] if warning else []


def plan_setup(facts: HostFacts, host: HostSpec, public_key: str,
               forced_command: str | None, helpers: tuple[HelperFile, ...] = (),
               private_dirs: tuple[str, ...] = ()) -> SetupPlan:
    """Compute every change for ``host`` from its facts; no I/O.

    ``forced_command`` None means: install no key (captured mode before any capture).
    ``helpers`` are root-only scripts the forced command needs (their current state is read
    from ``facts.files``, their folders' from ``facts.dirs``); ``private_dirs`` are more
    folders of ours that must exist, 0700 root.
    """
    warnings: list[str] = []
    changes: list[FileChange] = []
    steps: dict[str, State] = {}

    # sshd_config: the effective PermitRootLogin, in the file that decides it.
    sshd_facts = sshd.SshdFacts(
        main_path=SSHD_CONFIG,
        files={path: fact.content for path, fact in facts.files.items()
               if path == SSHD_CONFIG or any(path in m for m in facts.includes.values())},
        includes=facts.includes,
    )
    if SSHD_CONFIG not in facts.files:
        raise SetupError(f"{SSHD_CONFIG} does not exist on the host")
    sshd_plan = sshd.plan_permit_root_login(sshd_facts, PERMIT_ROOT_LOGIN)
    warnings.extend(sshd_plan.warnings)
    if facts.sshd_T_error:
        raise SetupError(f"sshd -T fails on the current configuration: {facts.sshd_T_error}")
    effective = facts.effective.get("permitrootlogin", "")
    if sshd_plan.changed:
        fact = facts.files[sshd_plan.path]
        changes.append(FileChange("sshd_config", sshd_plan.path, sshd_plan.old, sshd_plan.new,
                                  fact.mode, fact.uid, fact.gid))
        steps["sshd_config"] = State.CHANGED
    elif effective and effective != PERMIT_ROOT_LOGIN:
        # The files already say it globally, yet sshd -T differs: a Match block applies to
        # the backup host's connection. Editing Match blocks is not ours to do.
        raise SetupError(
            f"PermitRootLogin is {PERMIT_ROOT_LOGIN} globally, but a Match block makes it "
            f"{effective!r} for connections from {facts.client_addr}; fix that Match block by hand"
        )
    else:
        steps["sshd_config"] = State.OK

    # /root/.ssh and authorized_keys.
    root_ssh = facts.dirs.get(ROOT_SSH)
    fix_root_ssh = root_ssh != (0o700, 0, 0)
    current_keys = facts.content(AUTHORIZED_KEYS)
    if forced_command is None:
        # Captured mode before a capture: the key must grant nothing, so a line it still
        # has from another mode (a daemon forced command) goes.
        key = rootkey.parse_public_key(public_key)
        removal = rootkey.plan_authorized_keys(current_keys, None, key)
        fact = facts.files.get(AUTHORIZED_KEYS)
        if removal.changed and fact is not None:
            changes.append(FileChange("authorized_keys", AUTHORIZED_KEYS, current_keys,
                                      removal.new, fact.mode, fact.uid, fact.gid))
            steps["authorized_keys"] = State.REMOVED
            warnings.append("no captured command yet: the backup key's earlier line was "
                            "removed; run `invoke capture-command`")
        else:
            steps["authorized_keys"] = State.SKIPPED
            warnings.append("no captured command yet: no key installed; "
                            "run `invoke capture-command`")
    else:
        key = rootkey.parse_public_key(public_key)
        restrict = facts.openssh is None or platforms.supports_restrict(facts.openssh)
        from_ = hardened.wanted_from(host.from_, facts.client_addr)
        if from_ is None and host.from_ is None:
            warnings.append(f"the server did not report the backup host's address "
                            f"({facts.client_addr!r}): the backup key's line has no from=; "
                            "set `from` in the inventory")
        options = rootkey.build_options(forced_command, restrict=restrict, from_=from_)
        line = rootkey.render_key_line(key, options).rstrip("\n")
        rootkey.validate_key_line(line, forced_command=forced_command)
        keys_plan = rootkey.plan_authorized_keys(current_keys, line, key)
        if keys_plan.unrestricted_root_keys:
            listed = ", ".join(keys_plan.unrestricted_root_keys)
            warnings.append(
                "root keys without command= stop working under PermitRootLogin "
                f"{PERMIT_ROOT_LOGIN}: {listed}"
            )
        fact = facts.files.get(AUTHORIZED_KEYS)
        mode_ok = fact is not None and (fact.mode, fact.uid, fact.gid) == (0o600, 0, 0)
        if keys_plan.changed or not mode_ok:
            changes.append(FileChange("authorized_keys", AUTHORIZED_KEYS, current_keys,
                                      keys_plan.new, 0o600, 0, 0, check_line=line))
            steps["authorized_keys"] = State.CHANGED
        else:
            steps["authorized_keys"] = State.OK
    if fix_root_ssh:
        steps["authorized_keys"] = State.CHANGED

    # rsyncd: daemon mode's module, in pullback's own file (0600 root, in a 0700 root
    # folder); captured mode serves no module, so a file left from daemon mode goes.
    own_dirs: list[str] = []
    current_conf = facts.content(PULLBACK_RSYNCD_CONF)
    if host.forced_command == Mode.DAEMON:
        allow, allow_warnings = rsyncd.hosts_allow_for(host.from_, facts.client_addr)
        warnings.extend(allow_warnings)
        settings = rsyncd.RsyncdSettings(module=host.backup.module, path="/",
                                         hosts_allow=allow)
        conf_plan = rsyncd.plan_pullback_conf(current_conf, settings)
        fact = facts.files.get(PULLBACK_RSYNCD_CONF)
        mode_ok = fact is not None and (fact.mode, fact.uid, fact.gid) == (0o600, 0, 0)
        own_dirs.append(PULLBACK_DIR)
        dir_ok = facts.dirs.get(PULLBACK_DIR) == PRIVATE
        if conf_plan.changed or not mode_ok:
            changes.append(FileChange("rsyncd.conf", PULLBACK_RSYNCD_CONF, conf_plan.old,
                                      conf_plan.new, 0o600, 0, 0))
        steps["rsyncd.conf"] = State.CHANGED if conf_plan.changed or not (mode_ok and dir_ok) \
            else State.OK
    elif current_conf is not None:
        fact = facts.files[PULLBACK_RSYNCD_CONF]
        changes.append(FileChange("rsyncd.conf", PULLBACK_RSYNCD_CONF, current_conf, None,
                                  fact.mode, fact.uid, fact.gid))
        steps["rsyncd.conf"] = State.REMOVED

    # /etc/rsyncd.conf: the module the previous version put there goes, in either mode.
    legacy = rsyncd.plan_legacy_removal(facts.content(RSYNCD_CONF))
    warnings.extend(legacy.warnings)
    if legacy.changed:
        fact = facts.files[RSYNCD_CONF]
        changes.append(FileChange("old rsyncd module", RSYNCD_CONF, legacy.old, legacy.new,
                                  fact.mode, fact.uid, fact.gid))
        steps["old rsyncd module"] = State.REMOVED

    # Scripts of ours (captured mode): before the key line that points at them.
    wanted_dirs = dict.fromkeys([*(posixpath.dirname(h.path) for h in helpers), *private_dirs])
    make_dirs = tuple(d for d in [*wanted_dirs, *own_dirs] if facts.dirs.get(d) != PRIVATE)
    for helper in helpers:
        fact = facts.files.get(helper.path)
        current = None if fact is None else (fact.content, (fact.mode, fact.uid, fact.gid))
        if current != (helper.content, PRIVATE):
            changes.append(FileChange(helper.step, helper.path, fact.content if fact else None,
                                      helper.content, *PRIVATE, check_sh=True))
            steps[helper.step] = State.CHANGED
        else:
            steps[helper.step] = State.OK
    if wanted_dirs:
        steps["folders"] = State.CHANGED if make_dirs else State.OK

    # authorized_keys before sshd_config: the key works as soon as root login is limited;
    # the scripts a forced command runs come before the key line naming them.
    # The old module goes last: a pull still running on the old forced command keeps it
    # until the new key line is in place.
    order = {"rsyncd.conf": 0, "authorized_keys": 2, "sshd_config": 3, "old rsyncd module": 4}
    changes.sort(key=lambda change: order.get(change.step, 1))
    return SetupPlan(
        host=host.name, changes=tuple(changes), fix_root_ssh=fix_root_ssh,
        reload_sshd=any(c.step == "sshd_config" for c in changes),
        client_addr=facts.client_addr, sshd=facts.sshd, service=facts.service,
        pidfile=facts.pidfile,
        forced_command=forced_command, warnings=tuple(warnings), steps=steps,
        create_root_ssh=fix_root_ssh and root_ssh is None, make_dirs=make_dirs,
        root_ssh_was=root_ssh if fix_root_ssh else None,
        new_dirs=tuple(d for d in make_dirs if d not in facts.dirs),
    )


def plan_forced_rsync(facts: HostFacts, host: HostSpec, public_key: str) -> SetupPlan | None:
    """build-rsync's last step on a host: point the backup key's daemon forced command at
    the pinned build it has just installed (setup-remote may have run before the build
    existed, and left the host's own rsync in the key line: the card's order).

    Only the key line changes, through the same transaction as setup-remote's. None when
    there is nothing to do: no key line yet (setup-remote's job), captured mode (the gate
    runs the rsync it was captured with: capture again), or already the pinned build.
    """
    pinned = host.rsync.remote_binary
    if host.forced_command != Mode.DAEMON or pinned not in facts.rsync:
        return None
    key = rootkey.parse_public_key(public_key)
    current = rootkey.forced_command_of(facts.content(AUTHORIZED_KEYS), key.blob)
    wanted = hardened.daemon_command(pinned)
    if current is None or current == wanted or " --server --daemon" not in current:
        return None
    full = plan_setup(facts, host, public_key, wanted)
    keys = tuple(c for c in full.changes if c.step == "authorized_keys")
    if not keys:
        return None
    return dataclasses.replace(
        full, changes=keys, reload_sshd=False, fix_root_ssh=False, make_dirs=(), new_dirs=(),
        create_root_ssh=False, root_ssh_was=None, steps={"authorized_keys": State.CHANGED},
        warnings=())

