"""The sandbox around this machine's receiving rsync, pure: the bubblewrap (``bwrap``) argv.

The local rsync of a pull runs as root and parses what a server sends; a server that
exploits a flaw in it would otherwise write anywhere on the backup host. Inside the
sandbox (it, and the ssh it spawns)::

    bwrap --ro-bind / / --dev /dev --proc /proc
          --tmpfs /tmp --tmpfs /var/tmp --tmpfs /run [--tmpfs PARENT-OF-DEST]
          --bind DEST DEST [--ro-bind KEY KEY ...]
          --unshare-pid --unshare-ipc --new-session --die-with-parent
          --cap-drop ALL --cap-add CAP_CHOWN ... -- rsync ...

- Everything is read-only but the run's own destination (backup: ``DEST``; restore: the
  ``--to`` folder). bwrap mounts every bind ``nosuid,nodev`` (and sets no_new_privs), so no
  setuid or file-capability binary raises a privilege, and a device node rsync creates
  cannot be opened there.
- ``/tmp``, ``/var/tmp`` and ``/run`` are empty: the sockets of root's services live there
  (systemd's ``/run/systemd/private``, D-Bus, podman), and a process running as uid 0
  that reached one could have them run anything. The folder holding DEST is empty too,
  so the other hosts' copies and every ``DEST.pullback`` are out of sight; the few files
  the run reads from hidden folders (the key, known_hosts, the rsync binary, an agent
  socket) are bound back read-only.
- Its own PID and IPC namespaces: no signal to, no ``/proc`` of, the host's processes.
- ``--new-session``: no controlling terminal to push keystrokes into (TIOCSTI), except on
  a terminal with a passphrase key and no agent, where ssh must ask (``new_session``).
- Capabilities: exactly ``CAPABILITIES``, what exact owners, modes, devices, ACLs and file
  capabilities need. Never ``CAP_SYS_ADMIN`` (mount: remount ``/`` read-write) and never
  ``CAP_DAC_READ_SEARCH`` (``open_by_handle_at``: open any inode of a file system through
  a writable mount of it, the "shocker" escape; ``CAP_DAC_OVERRIDE`` already reads all).
- The network is shared: ssh needs it.

Without ``CAP_SYS_ADMIN`` the receiver cannot write ``trusted.*`` xattrs (a server's
overlayfs upper folders, glusterfs bricks); with ``-X`` the pull excludes them
(``XATTR_FILTERS``) rather than fail every run with exit 23. ``backup.sandbox: false``
keeps them, without the sandbox.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# CAP_CHOWN: the server's owners and groups (--numeric-ids).
# CAP_DAC_OVERRIDE: write into (and read) folders and files whose mode shuts out root as a
#   non-owner, e.g. a 0555 folder of another uid, an 0000 file.
# CAP_FOWNER: chmod, utimes, ACLs and xattrs on files owned by other uids.
# CAP_FSETID: keep setuid/setgid bits (chmod of a file whose group root is not in).
# CAP_MKNOD: the server's device nodes.
# CAP_SETFCAP: file capabilities (security.capability, e.g. ping's cap_net_raw).
CAPABILITIES = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_MKNOD",
                "CAP_SETFCAP")
# Emptied in every sandbox: service sockets and shared scratch space.
HIDDEN = ("/tmp", "/var/tmp", "/run")
# The receiver cannot set these without CAP_SYS_ADMIN: not asked for (-X only).
XATTR_FILTERS = ("--filter=-x trusted.*",)


def build_sandbox(command: Sequence[str], *, bwrap: str, writable: Iterable[str],
                  hidden: Iterable[str] = (), readable: Iterable[str] = (),
                  new_session: bool = True) -> list[str]:
    """``command`` inside the sandbox: ``writable`` folders (absolute, existing) bound
    read-write, ``hidden`` ones (besides ``HIDDEN``) empty, ``readable`` paths bound
    read-only over whatever hides them. Mounts apply in argv order: hide, then bind."""
    argv = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for path in dict.fromkeys([*HIDDEN, *hidden]):
        argv += ["--tmpfs", _absolute(path)]
    for path in dict.fromkeys(writable):
        argv += ["--bind", _absolute(path), _absolute(path)]
    for path in dict.fromkeys(readable):
        argv += ["--ro-bind", _absolute(path), _absolute(path)]
    argv += ["--unshare-pid", "--unshare-ipc", "--die-with-parent"]
    if new_session:
        argv.append("--new-session")
    argv += ["--cap-drop", "ALL"]
    for cap in CAPABILITIES:
        argv += ["--cap-add", cap]
    return [*argv, "--", *command]


def _absolute(path: str) -> str:
    if not path.startswith("/") or "\n" in path:
        raise ValueError(f"sandbox paths must be absolute: {path!r}")
    return path

