#!/bin/bash
# ussycode guest init (container runtime): PID 1 inside the VM's PID namespace.
#
# The host bind-mounts this file read-only at /run/ussycode/init and the VM's metadata at /run/ussycode/meta:
#   meta/authorized_keys  keys that may log in as `ussycode` (the gateway's key among them)
#   meta/env.sh           `export K='v'` lines (already shell-quoted by the host) for login shells
#   meta/resolv.conf      the resolver when the VM has egress
#   meta/fresh-host-keys  present on a copy's first boot: replace the source's SSH host keys
# The host never writes into the VM's file system: whatever it hands over, this script installs, inside the VM.
# It runs with oom_score_adj -999 where the host may lower it (the OOM killer takes it last); what it starts gets
# 100 (`spawn`), so a runaway process dies, not the VM.
# It generates per-VM SSH host keys on first boot, installs the metadata, runs sshd in the foreground,
# reaps orphans (bash's SIGCHLD handler waits for every child, including re-parented ones) and exits
# cleanly on SIGTERM. When PID 1 exits the kernel kills everything else in the namespace.
set -u
META=/run/ussycode/meta
log() { echo "ussycode-init: $*"; }

shutdown() {
    log "SIGTERM: stopping"
    [ -n "${SSHD_PID:-}" ] && kill -TERM "$SSHD_PID" 2>/dev/null
    # Give every process a chance to exit in order, then leave (the kernel SIGKILLs the rest).
    kill -TERM -1 2>/dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        [ -z "$(jobs -pr)" ] && break
        sleep 0.2
    done
    sync
    exit 0
}
trap shutdown TERM INT

# Run a long-lived service with an OOM score above init's (raising one's own score needs no privilege).
spawn() { ( echo 100 > /proc/self/oom_score_adj 2>/dev/null; exec "$@" ) & }

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mkdir -p /run/sshd /run/lock && chmod 0755 /run/sshd

# Host keys belong to this VM alone: never baked into the image, made here on first boot (a copy's again).
if [ -f "$META/fresh-host-keys" ]; then
    log "this VM is a copy: replacing the SSH host keys"
    rm -f /etc/ssh/ssh_host_*
fi
# ed25519 and ECDSA only: an RSA key takes most of a second to make, and nothing needs it.
for t in ed25519 ecdsa; do
    if [ ! -s "/etc/ssh/ssh_host_${t}_key" ]; then
        log "generating the SSH host key ($t)"
        ssh-keygen -q -t "$t" -N '' -f "/etc/ssh/ssh_host_${t}_key"
    fi
done

# sudo and friends resolve the hostname: make it resolvable.
HOST="$(hostname)"
grep -qw "$HOST" /etc/hosts 2>/dev/null || echo "127.0.1.1 $HOST" >> /etc/hosts

if [ -f "$META/authorized_keys" ]; then
    install -d -m 0700 -o 1000 -g 1000 /home/ussycode/.ssh
    install -m 0600 -o 1000 -g 1000 "$META/authorized_keys" /home/ussycode/.ssh/authorized_keys
fi
if [ -f "$META/resolv.conf" ]; then
    rm -f /etc/resolv.conf && install -m 0644 -o 0 -g 0 "$META/resolv.conf" /etc/resolv.conf
fi
if [ -f "$META/env.sh" ]; then
    install -m 0644 -o 0 -g 0 "$META/env.sh" /etc/profile.d/ussycode.sh
fi

# Per-VM start-up hook a user may add (runs as root, like rc.local).
if [ -x /etc/rc.local ]; then
    spawn /etc/rc.local
fi

log "starting sshd"
while :; do
    spawn /usr/sbin/sshd -D -e
    SSHD_PID=$!
    # `wait PID` returns when sshd exits or a trapped signal arrives.
    wait "$SSHD_PID"
    log "sshd exited ($?); restarting in 1s"
    sleep 1
done
