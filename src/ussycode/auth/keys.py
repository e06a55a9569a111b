"""SSH public keys: parsing users' keys, fingerprints, and the server's own persisted keys."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from ussycode.errors import UsageError
from ussycode.validate import printable_text

# Key types we accept from users. DSA and short RSA are refused.
ALLOWED_KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
})
MIN_RSA_BITS = 2048
MAX_KEY_LINE = 16 * 1024
MAX_KEY_COMMENT = 200


@dataclass(frozen=True)
class PublicKey:
    key_type: str
    openssh: str  # "type base64", no comment
    comment: str
    fingerprint: str  # "SHA256:…"


def describe(key: asyncssh.SSHKey, comment: str = "") -> PublicKey:
    """Validate a key the server received or parsed; raise UsageError for unsupported types or sizes."""
    alg = key.get_algorithm()
    if alg not in ALLOWED_KEY_TYPES:
        raise UsageError(f"unsupported key type {alg}; use ssh-ed25519, ecdsa or rsa (>= {MIN_RSA_BITS} bits)")
    if alg == "ssh-rsa":
        bits = getattr(getattr(key, "pyca_key", None), "key_size", MIN_RSA_BITS)
        if bits < MIN_RSA_BITS:
            raise UsageError(f"RSA key of {bits} bits is too short; use at least {MIN_RSA_BITS} bits or ed25519")
    data = key.export_public_key("openssh").decode().strip().split()
    return PublicKey(alg, f"{data[0]} {data[1]}", comment, key.get_fingerprint("sha256"))


def parse_authorized_key(line: str) -> PublicKey:
    """Parse one authorized_keys line (``type base64 [comment]``); options are not accepted."""
    # Only spaces are trimmed: any other stray character (a control, a bidi override…) is refused, not hidden.
    line = line.strip(" ")
    if not line:
        raise UsageError("empty key; paste one line of the form 'ssh-ed25519 AAAA… comment'")
    if len(line) > MAX_KEY_LINE:
        raise UsageError("that is not a single public key line")
    parts = re.split(" +", line, maxsplit=2)
    comment = parts[2].strip(" ") if len(parts) > 2 else ""
    printable_text(comment, "key comment", max_len=MAX_KEY_COMMENT)
    printable_text(" ".join(parts[:2]), "key", max_len=MAX_KEY_LINE)
    try:
        key = asyncssh.import_public_key(" ".join(parts[:2]))
    except (asyncssh.KeyImportError, ValueError, UnicodeError) as exc:
        raise UsageError(f"not a valid public key: {exc}") from None
    return describe(key, comment)


def load_or_create_private_key(path: Path) -> asyncssh.SSHKey:
    """An ed25519 key persisted at ``path`` (0600), created on first use."""
    if path.exists():
        return asyncssh.read_private_key(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    key = asyncssh.generate_private_key("ssh-ed25519")
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.export_private_key())
    tmp.rename(path)
    path.with_suffix(".pub").write_bytes(key.export_public_key())
    return key
