#!/bin/sh
# ussycode image customisation; run by mmdebstrap as a customize hook: $1 is the new root filesystem.
# $2 is this directory (the guest files shipped with ussycode).
set -eu
ROOT="$1"
GUEST="$2"

chroot "$ROOT" /usr/sbin/useradd --uid 1000 --user-group --create-home --shell /bin/bash ussycode
# Log in by key only: lock the password (a `!` hash), but keep the account usable for pubkey logins.
chroot "$ROOT" /usr/sbin/usermod -p '*' ussycode
echo 'ussycode ALL=(ALL) NOPASSWD:ALL' > "$ROOT/etc/sudoers.d/ussycode"
chmod 0440 "$ROOT/etc/sudoers.d/ussycode"

install -D -m 0644 "$GUEST/sshd_config" "$ROOT/etc/ssh/sshd_config.d/ussycode.conf"
# Every VM makes its own host keys at first boot (see init.sh): none may be baked into the image.
rm -f "$ROOT"/etc/ssh/ssh_host_*
# No audit capability in a container VM: pam_loginuid cannot set the login uid, which must not block logins.
sed -i 's/^session\s\+required\s\+pam_loginuid.so/session optional pam_loginuid.so/' "$ROOT/etc/pam.d/sshd"
install -D -m 0755 "$GUEST/init.sh" "$ROOT/usr/local/sbin/ussycode-init"

# Tools that behave as in a VM: a real hostname file, a resolver, no policy-rc.d leftovers.
echo ussycode > "$ROOT/etc/hostname"
[ -s "$ROOT/etc/resolv.conf" ] || echo 'nameserver 169.254.169.254' > "$ROOT/etc/resolv.conf"
rm -f "$ROOT/usr/sbin/policy-rc.d"
# Services are never started by package scripts inside a container VM (no systemd): say so.
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
# What an agent (or a person) working in the VM should know about it.
install -D -m 0644 -o 1000 -g 1000 "$GUEST/AGENTS.md" "$ROOT/home/ussycode/AGENTS.md"

# AI agents (the full image only: it has npm). Pinned: Node 22 from the npm registry (Debian's 18 is too old for
# pi), pi and opencode; configured for the LLM gateway on the metadata address, so no key is ever in the VM.
if [ -x "$ROOT/usr/bin/npm" ]; then
    NODE_VERSION=22.12.0
    PI_VERSION=0.73.1
    OPENCODE_VERSION=1.18.33
    # The download trusts what the host trusts (a site CA of a proxy in front of the registry, say) and uses the
    # host's registry setting; neither stays in the image.
    NPM_ENV="PATH=/usr/local/bin:/usr/bin:/bin"
    if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
        cp /etc/ssl/certs/ca-certificates.crt "$ROOT/tmp/ussycode-build-ca.crt"
        NPM_ENV="$NPM_ENV npm_config_cafile=/tmp/ussycode-build-ca.crt"
    fi
    [ -z "${NPM_CONFIG_REGISTRY:-}" ] || NPM_ENV="$NPM_ENV npm_config_registry=$NPM_CONFIG_REGISTRY"
    # shellcheck disable=SC2086
    chroot "$ROOT" env $NPM_ENV npm install --global --no-fund --no-audit --loglevel=error "node@$NODE_VERSION"
    # shellcheck disable=SC2086
    chroot "$ROOT" env $NPM_ENV npm install --global --no-fund --no-audit \
        --loglevel=error "@mariozechner/pi-coding-agent@$PI_VERSION" "opencode-ai@$OPENCODE_VERSION"
    rm -f "$ROOT/tmp/ussycode-build-ca.crt"
    rm -rf "$ROOT/root/.npm"
    chroot "$ROOT" env PATH=/usr/local/bin:/usr/bin:/bin pi --version
    chroot "$ROOT" env PATH=/usr/local/bin:/usr/bin:/bin opencode --version
    install -D -m 0644 -o 1000 -g 1000 "$GUEST/agents/pi-models.json" "$ROOT/home/ussycode/.pi/agent/models.json"
    install -D -m 0644 -o 1000 -g 1000 "$GUEST/agents/pi-settings.json" "$ROOT/home/ussycode/.pi/agent/settings.json"
    install -D -m 0644 -o 1000 -g 1000 "$GUEST/agents/opencode.json" "$ROOT/home/ussycode/.config/opencode/opencode.json"
    chown -R 1000:1000 "$ROOT/home/ussycode/.pi" "$ROOT/home/ussycode/.config"
    install -D -m 0644 "$GUEST/agents/agent-login.sh" "$ROOT/etc/profile.d/zz-ussycode-agent.sh"
fi
