#!/bin/sh
# Start of a lab container: fresh host keys, the admin's key from the environment (for
# `admin` and `operator`), sshd in the foreground (not PID 1: the engine's --init is, so
# SIGHUP reaches sshd). `--keys-only`: the keys alone (the systemd flavour runs this from
# pullback-lab-keys.service, and systemd starts sshd).
set -eu
ssh-keygen -A >/dev/null
mkdir -p /run/sshd
install -d -m 0700 -o admin -g admin /home/admin/.ssh
printf '%s\n' "${PULLBACK_ADMIN_PUBKEY:?PULLBACK_ADMIN_PUBKEY is not set}" > /home/admin/.ssh/authorized_keys
chown admin:admin /home/admin/.ssh/authorized_keys
chmod 0600 /home/admin/.ssh/authorized_keys
# `operator` (sudo needs a password) logs in with the same key.
install -d -m 0700 -o operator -g "$(id -gn operator)" /home/operator/.ssh
printf '%s\n' "$PULLBACK_ADMIN_PUBKEY" > /home/operator/.ssh/authorized_keys
chown operator:"$(id -gn operator)" /home/operator/.ssh/authorized_keys
chmod 0600 /home/operator/.ssh/authorized_keys
if [ "${1:-}" = --keys-only ]; then exit 0; fi
exec /usr/sbin/sshd -D -e
