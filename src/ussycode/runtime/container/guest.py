"""What the host writes for a container VM's guest and reads back from it (pure): the environment script, the
authorized_keys file, and a user's ids and home from the guest's /etc/passwd and /etc/group."""

from __future__ import annotations

import shlex

from ussycode.errors import NotFound, RuntimeFailure


def env_script(env: dict[str, str]) -> str:
    """``/etc/profile.d/ussycode.sh`` for ``env``: one shell-quoted export per variable (pure)."""
    lines = ["# Written by ussycode at every boot; edits are overwritten."]
    for key in sorted(env):
        if not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise RuntimeFailure(f"environment variable name {key!r} is not a valid shell identifier")
        lines.append(f"export {key}={shlex.quote(env[key])}")
    return "\n".join(lines) + "\n"


def authorized_keys_file(keys: tuple[str, ...]) -> str:
    """authorized_keys content (pure); a key with a newline in it would smuggle in a second key: refused."""
    for key in keys:
        if "\n" in key or "\r" in key:
            raise RuntimeFailure("an authorized key contains a line break")
    return "".join(key.strip() + "\n" for key in keys if key.strip())


def parse_passwd(passwd: str, group: str, user: str) -> tuple[int, int, list[int], str]:
    """(uid, gid, supplementary gids, home) of ``user`` from /etc/passwd and /etc/group texts (pure)."""
    for line in passwd.splitlines():
        parts = line.split(":")
        if len(parts) >= 7 and parts[0] == user:
            uid, gid, home = int(parts[2]), int(parts[3]), parts[5]
            groups = [gid]
            for gline in group.splitlines():
                gparts = gline.split(":")
                if len(gparts) >= 4 and user in gparts[3].split(",") and gparts[2].isdigit():
                    groups.append(int(gparts[2]))
            return uid, gid, groups, home
    raise NotFound(f"no user {user!r} in the VM")
