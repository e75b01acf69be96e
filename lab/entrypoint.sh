#!/bin/sh
# Start of a lab container: fresh host keys, the admin's key from the environment, sshd in
# the foreground (not PID 1: the engine's --init is, so SIGHUP reaches sshd).
set -eu
ssh-keygen -A >/dev/null
mkdir -p /run/sshd
install -d -m 0700 -o admin -g admin /home/admin/.ssh
printf '%s\n' "${PULLBACK_ADMIN_PUBKEY:?PULLBACK_ADMIN_PUBKEY is not set}" > /home/admin/.ssh/authorized_keys
chown admin:admin /home/admin/.ssh/authorized_keys
chmod 0600 /home/admin/.ssh/authorized_keys
exec /usr/sbin/sshd -D -e
