"""What rsync's (and ssh's) errors mean for a pullback backup: one table for every command.

``backup`` explains a failed pull with it, ``doctor --explain`` explains pasted output,
and ``doctor`` labels the errors of its test pull. Pure: no I/O; ssh's own failures come
from ``roles.core.ssh_failures`` first.
"""

from __future__ import annotations

import re

from roles.core.ssh_failures import classify_ssh_failure

EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "syntax or usage error: an option the local rsync does not know; check "
       "backup.options against its version",
    2: "protocol incompatibility: the two rsyncs disagree; both ends must run the same "
       "rsync: `invoke build-rsync`",
    3: "errors selecting input/output files or folders: backup.source is probably not "
       "there on the host",
    4: "requested action not supported by one of the rsyncs (an option the other end "
       "does not know)",
    5: "error starting the client-server protocol: '@ERROR: Unknown module' means the "
       "module is missing from /etc/pullback/rsyncd.conf or its `hosts allow` does not "
       "admit the backup host (`invoke setup-remote`); 'max connections' means "
       "another pull of this host runs; 'protocol version mismatch -- is your shell clean?' "
       "means a daemon forced command was used without host::module, or the login prints "
       "text",
    6: "the rsync daemon could not write its log file",
    10: "error in socket I/O: the connection dropped",
    11: "error in file I/O: the local destination is full or not writable",
    12: "error in the rsync protocol data stream: usually the remote side died, or the "
        "forced command does not match what the client sent ('pullback gate: refused': the "
        "options or an rsync changed since the capture; run `invoke capture-command` again)",
    13: "errors with program diagnostics",
    14: "error in rsync's IPC code",
    20: "interrupted (SIGINT, SIGTERM or SIGUSR1)",
    21: "waitpid() failed",
    22: "rsync could not allocate memory",
    23: "partial transfer due to error: some files could not be read or written (see the "
        "log; 'Permission denied' on the server side means the daemon does not run as "
        "uid 0)",
    24: "partial transfer: some files vanished on the server while they were copied",
    25: "the --max-delete limit stopped deletions: the source may have come back empty or "
        "nearly empty; check the server before raising backup.max_delete",
    30: "timeout in data send/receive",
    35: "timeout waiting for the daemon connection",
    255: "ssh failed: host key unknown or changed, backup key rejected (PermitRootLogin, "
         "authorized_keys), or the network",
}


def explain_exit(code: int) -> str:
    if code in EXIT_CODES:
        return EXIT_CODES[code]
    if code < 0:
        return f"rsync was killed by signal {-code}"
    return f"rsync exit code {code} (see `man rsync`, EXIT VALUES)"


SIGNATURES: tuple[tuple[str, str, str], ...] = (
    # (regex, label, explanation)
    (r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED|"
     r"No \S+ host key is known", "Host key verification failed",
     "the server's host key is not the one in the inventory's known_hosts (unknown or "
     "changed). pullback never accepts an unknown key: verify the fingerprint out of band "
     "(`invoke doctor` shows it) and add it to known_hosts."),
    (r"Permission denied \(publickey", "Permission denied (publickey)",
     "sshd refused the backup key: PermitRootLogin is not forced-commands-only (or is no), "
     "the key is not in /root/.ssh/authorized_keys or has no command=, from= excludes this "
     "client, or StrictModes rejects the file modes. Run `invoke doctor`, then "
     "`invoke setup-remote`."),
    (r"Connection refused|Connection timed out|No route to host|Could not resolve hostname|"
     r"Network is unreachable", "network",
     "ssh could not reach sshd: wrong address or port in the inventory, sshd down, or a "
     "firewall."),
    (r"rsync: (?:command )?not found|rsync: No such file or directory|"
     r"/rsync: not found", "rsync not found",
     "the forced command names an rsync that does not exist on the server: run "
     "`invoke build-rsync` (installs rsync.prefix/bin/rsync), then `invoke setup-remote`."),
    (r"pullback gate: refused", "pullback gate: refused",
     "the capture gate (captured mode's forced command) refused what the client sent: only "
     "the recorded pull of backup.source and its dry run pass. The options, excludes, source "
     "or local rsync changed since capture (run `invoke capture-command` again), or the "
     "client used daemon mode's host::module (set forced_command: captured)."),
    (r"protocol version mismatch", "protocol version mismatch -- is your shell clean?",
     "the client read something other than rsync's greeting. With pullback this is almost "
     "always a daemon forced command (`rsync --server --daemon .`) answering a single-colon "
     "source (root@host:/): the daemon's '@RSYNCD:' greeting is not what a single-colon "
     "client expects. Daemon mode needs root@host::MODULE/ (forced_command: daemon), or "
     "install the captured command (`invoke capture-command`). Otherwise a startup file of "
     "the remote account (~/.bashrc, /etc/bash.bashrc, ~/.ssh/rc, /etc/ssh/sshrc) prints text "
     "on stdout: `invoke doctor` runs the clean-shell test for the admin and for root."),
    (r"rather than greeting", "server sent ... rather than greeting",
     "the daemon-mode client read text where the daemon's '@RSYNCD:' greeting belongs: a "
     "startup file of root's shell (~/.bashrc, /etc/bash.bashrc, /etc/ssh/sshrc) prints it "
     "when sshd starts the forced command. `invoke doctor` names the file; make it silent."),
    (r"did not see server greeting", "did not see server greeting",
     "the daemon-mode client got no '@RSYNCD:' greeting: the forced command did not start an "
     "rsync daemon (its rsync path is missing, or it is not `rsync --server --daemon "
     "--config=/etc/pullback/rsyncd.conf .`) or "
     "sshd closed the session. `invoke doctor` checks the forced command."),
    (r"@ERROR: Unknown module", "@ERROR: Unknown module",
     "the rsync daemon started by the forced command has no such module for this client: "
     "the file of its --config= (/etc/pullback/rsyncd.conf) lacks [MODULE], backup.module "
     "differs, or the module's `hosts allow` does not admit the backup host's address (a "
     "hidden module answers 'Unknown module', not 'access denied'; over ssh the daemon "
     "takes the address from SSH_CONNECTION). Run `invoke setup-remote` from the backup "
     "host."),
    (r"@ERROR: access denied", "@ERROR: access denied",
     "the module's `hosts allow` / `hosts deny` (or `auth users`) refuses the client. Over "
     "ssh the daemon sees the address from SSH_CONNECTION; let setup-remote rewrite the "
     "module or fix those lines by hand."),
    (r"@ERROR: max connections", "@ERROR: max connections reached",
     "another pull of this host is running (max connections = 1), or a stale lock file; "
     "wait for it or check `lock file` in /etc/pullback/rsyncd.conf."),
    (r"The server is configured to refuse", "the server is configured to refuse --OPTION",
     "pullback's module refuses every option that writes or deletes on the server "
     "(`refuse options` in /etc/pullback/rsyncd.conf): --remove-source-files, --delete* sent "
     "to the server, --backup-dir, --partial-dir, ... Remove that option from "
     "backup.options; a pull's own --delete is fine (it deletes on the backup host and is "
     "never sent)."),
    (r"module is read only", "module is read only",
     "something tried to WRITE to the server through the backup key: the module is "
     "read-only by design; pull, never push."),
    (r"Invalid file index", "Invalid file index",
     "the two ends disagree about the file list: the forced command does not match what the "
     "client sent (a dry-run `n` baked into it, or options changed since it was captured), "
     "or two incompatible rsync builds (the seed's 2.6.8). Re-capture with the real options "
     "(`invoke capture-command`) and run one build on both ends (`invoke build-rsync`)."),
    (r"failed: Permission denied \(13\)", "Permission denied (13) on the server",
     "the daemon cannot read those files: the module lacks `uid = 0` / `gid = 0`, so a root "
     "daemon dropped to nobody. Run `invoke setup-remote`."),
    (r"connection unexpectedly closed", "connection unexpectedly closed",
     "the remote side ended the session: the forced command's rsync is missing or crashed, "
     "sshd refused the key (PermitRootLogin, authorized_keys, from=), or the remote rsync "
     "refused the options. The line before it in the output usually names the cause; "
     "`invoke doctor` checks the forced command's path and runs a test pull."),
    (r"error in rsync protocol data stream", "error in rsync protocol data stream",
     "rsync code 12: the data stream broke, usually because the remote rsync died or the "
     "forced command does not match what the client sent (dry-run flag, drifted options)."),
    (r"file has vanished", "file has vanished",
     "files changed while they were copied (code 24): harmless for a live system; pullback "
     "counts the run as a success with a warning."),
    (r"writefd_unbuffered failed|Broken pipe", "broken pipe",
     "one side stopped reading: look for the other side's error before it (often a "
     "forced-command mismatch or a remote crash)."),
)
_CODE_PATTERNS = (
    re.compile(r"\(code (\d+)\)"),
    re.compile(r"\b(?:exit|exited|exit code|exit status|code|status)[ :=]+(\d+)\b", re.I),
)


def explain_rsync_error(text: str, *, ssh_first: bool = True) -> str:
    """Explanations for the known rsync/ssh errors in a pasted ``text`` (pure).

    Accepts whole outputs, single lines or a bare exit code (``12``). ``ssh_first``: an
    ssh failure (``roles.core.ssh_failures``) leads, in place of the general network line;
    doctor's test pull, which has checked the reach already, reads the signatures alone.
    """
    found: list[str] = []
    # ssh's own failure first (the same table backup and doctor use): "Connection timed out
    # during banner exchange" is a port that is not sshd, not the general network line.
    ssh = classify_ssh_failure(text) if ssh_first else None
    if ssh is not None:
        found.append(f"ssh failed ({ssh.kind}):\n  {ssh.meaning}; next: "
                     f"`invoke {ssh.task} --host H`")
    for pattern, label, explanation in SIGNATURES:
        if ssh is not None and label == "network":
            continue  # the ssh line above says which network failure it is
        if re.search(pattern, text, re.IGNORECASE):
            found.append(f"{label}:\n  {explanation}")
    codes: list[int] = []
    stripped = text.strip()
    if stripped.isdigit():
        codes.append(int(stripped))
    for pattern in _CODE_PATTERNS:
        codes.extend(int(m) for m in pattern.findall(text))
    for code in dict.fromkeys(codes):
        found.append(f"rsync exit code {code}:\n  {explain_exit(code)}")
    if not found:
        return ("no known rsync error in this text; run `invoke doctor --host H`: it checks "
                "the shell, both rsyncs, sshd, the forced command and makes a test pull")
    return "\n".join(found)


def signature(text: str) -> str | None:
    """The label of the first known signature in ``text``, if any."""
    for pattern, label, _ in SIGNATURES:
        if re.search(pattern, text, re.IGNORECASE):
            return label
    return None


def explanation(text: str) -> str | None:
    """The explanation of the first known message in ``text``, if any."""
    for pattern, _, explained in SIGNATURES:
        if re.search(pattern, text, re.IGNORECASE):
            return explained
    return None
