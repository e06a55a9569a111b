"""API tokens, pure: formats, parsing, hashing and SSHSIG verification (no I/O; the service owns the DB).

Two kinds of Bearer token are accepted by ``POST /exec`` (and, VM-scoped, on VM URLs):

``usy1.<id>.<secret>`` — a database token made by ``token create``. ``id`` is 12 characters of ``[a-z0-9]`` (the
public id shown by ``token list``; it is also the row's lookup prefix), ``secret`` is 32 random bytes in unpadded
base64url (43 characters). Only ``sha256(secret)`` (hex) is stored; it is compared in constant time.

``usy0.<perms>.<sig>`` — a stateless token the user signs with one of their registered SSH keys:

* ``perms`` is base64url (padding optional) of a JSON object with only these keys:
  ``exp`` (required, unix seconds, at most :data:`MAX_USY0_LIFETIME` ahead), ``nbf`` (optional, unix seconds),
  ``cmds`` (optional list of command names: the allowlist) and ``vm`` (optional VM name: the scope).
* ``sig`` is the signature made by ``ssh-keygen -Y sign -n ussycode-api`` over exactly the decoded ``perms`` bytes:
  the base64 body of the armored ``-----BEGIN SSH SIGNATURE-----`` block (the binary SSHSIG blob) with the
  armor lines and newlines removed, in base64url (``+/`` → ``-_``; standard base64 and padding are tolerated).

SSHSIG (OpenSSH ``PROTOCOL.sshsig``): the blob is ``"SSHSIG" uint32(1) string(publickey) string(namespace)
string(reserved) string(hash_algorithm) string(signature)``; the signature covers ``"SSHSIG" string(namespace)
string(reserved) string(hash_algorithm) string(H(message))`` with H = sha512 or sha256. The key that signed is
found by the fingerprint of ``publickey`` among registered keys, so removing a key from the account invalidates
every token it signed.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
import struct
from dataclasses import dataclass
from typing import Any

import asyncssh

USY1 = "usy1"
USY0 = "usy0"
SSHSIG_NAMESPACE = "ussycode-api"
MAX_TOKEN_LEN = 8192
MAX_CMDS = 64
MAX_USY0_LIFETIME = dt.timedelta(days=366)
NBF_LEEWAY = 60  # seconds of clock skew tolerated on ``nbf``
MAX_DURATION = dt.timedelta(days=3660)

_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_USY1_RE = re.compile(r"^usy1\.([a-z0-9]{12})\.([A-Za-z0-9_-]{43})$")
_B64_RE = re.compile(r"^[A-Za-z0-9_+/-]+=*$")
_CMD_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_VM_RE = re.compile(r"^[a-z][a-z0-9-]{1,28}[a-z0-9]$")
_DURATION_RE = re.compile(r"^([1-9][0-9]{0,5})([mhdwy])$")
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_SSHSIG_MAGIC = b"SSHSIG"
_HASHES = {"sha512": hashlib.sha512, "sha256": hashlib.sha256}
_REFUSED_SIG_ALGS = frozenset({b"ssh-rsa"})  # SHA-1 RSA signatures are not allowed by PROTOCOL.sshsig


class TokenError(ValueError):
    """A token is malformed, badly signed, not yet valid or expired. ``reason`` is a short machine word for the
    audit log; the message never contains the token."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# --- durations --------------------------------------------------------------------------------------------------

def parse_duration(text: str) -> dt.timedelta:
    """``30m``, ``12h``, ``7d``, ``2w``, ``1y`` → a timedelta; ValueError with a readable message otherwise."""
    m = _DURATION_RE.match(text.strip().lower())
    if not m:
        raise ValueError(f"invalid duration {text[:40]!r}: use a number and a unit, like 30m, 12h, 7d, 2w or 1y")
    value = dt.timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
    if value > MAX_DURATION:
        raise ValueError(f"duration {text[:40]!r} is too long; the longest is 10y")
    return value


# --- base64url ----------------------------------------------------------------------------------------------------

def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def b64url_decode(text: str) -> bytes:
    """Decode base64url or standard base64, padding optional; ValueError on anything else."""
    if not text or not _B64_RE.fullmatch(text):
        raise ValueError("not base64url")
    text = text.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise ValueError("not base64url") from None


# --- usy1 (database tokens) ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NewDbToken:
    id: str
    secret_hash: str
    token: str  # shown to the user once, never stored


@dataclass(frozen=True)
class DbTokenRef:
    id: str
    secret: str


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_db_token() -> NewDbToken:
    token_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))
    secret = b64url_encode(secrets.token_bytes(32))
    return NewDbToken(token_id, hash_secret(secret), f"{USY1}.{token_id}.{secret}")


def parse_db_token(token: str) -> DbTokenRef:
    m = _USY1_RE.fullmatch(token)
    if not m:
        raise TokenError("malformed", "malformed usy1 token")
    return DbTokenRef(m.group(1), m.group(2))


def secret_matches(ref: DbTokenRef, secret_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(ref.secret).encode(), secret_hash.encode())


# --- usy0 (stateless, SSH-signed) -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Perms:
    """The signed permissions of a usy0 token."""

    exp: int
    nbf: int | None = None
    cmds: tuple[str, ...] | None = None
    vm: str | None = None


@dataclass(frozen=True)
class SshSig:
    """A parsed SSHSIG blob."""

    public_key: bytes  # SSH wire encoding
    namespace: str
    reserved: bytes
    hash_algorithm: str
    signature: bytes  # SSH wire encoding: string(alg) string(sig) [...]

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.public_key)

    def signed_data(self, message: bytes) -> bytes:
        digest = _HASHES[self.hash_algorithm](message).digest()
        return (_SSHSIG_MAGIC + _string(self.namespace.encode()) + _string(self.reserved)
                + _string(self.hash_algorithm.encode()) + _string(digest))


@dataclass(frozen=True)
class StatelessToken:
    perms: Perms
    perms_bytes: bytes  # exactly what was signed
    sig: SshSig


def fingerprint_of(public_key_blob: bytes) -> str:
    """OpenSSH's ``SHA256:…`` fingerprint of a wire-format public key."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(public_key_blob).digest()).decode().rstrip("=")


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def string(self) -> bytes:
        return self.take(self.uint32())

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ValueError("trailing bytes")


def parse_sshsig(blob: bytes) -> SshSig:
    try:
        r = _Reader(blob)
        if r.take(6) != _SSHSIG_MAGIC:
            raise ValueError("not an SSHSIG blob")
        if r.uint32() != 1:
            raise ValueError("unsupported SSHSIG version")
        public_key, namespace, reserved = r.string(), r.string(), r.string()
        hash_algorithm, signature = r.string(), r.string()
        r.end()
        ns, alg = namespace.decode(), hash_algorithm.decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise TokenError("bad_signature", f"the signature is not a valid SSHSIG blob ({exc})") from None
    if alg not in _HASHES:
        raise TokenError("bad_signature", f"unsupported SSHSIG hash {alg[:20]!r}; use sha512 or sha256")
    return SshSig(public_key, ns, reserved, alg, signature)


def encode_sshsig(sig: SshSig) -> bytes:
    """The SSHSIG blob for ``sig`` (the inverse of :func:`parse_sshsig`)."""
    return (_SSHSIG_MAGIC + struct.pack(">I", 1) + _string(sig.public_key) + _string(sig.namespace.encode())
            + _string(sig.reserved) + _string(sig.hash_algorithm.encode()) + _string(sig.signature))


def _int_field(obj: dict[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**40:
        raise TokenError("bad_perms", f"perms: {key!r} must be unix seconds (an integer)")
    return value


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for every object, at any depth: a key given twice makes the perms ambiguous (json
    would keep the last value silently; another reader might keep the first), so the token is refused."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise TokenError("bad_perms", f"perms: the key {key[:20]!r} appears twice")
        obj[key] = value
    return obj


def parse_perms(data: bytes) -> Perms:
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_refuse_duplicate_keys)
    except TokenError:
        raise
    except (UnicodeDecodeError, ValueError):
        raise TokenError("bad_perms", "perms: not a UTF-8 JSON object") from None
    if not isinstance(obj, dict):
        raise TokenError("bad_perms", "perms: not a JSON object")
    unknown = set(obj) - {"exp", "nbf", "cmds", "vm"}
    if unknown:
        raise TokenError("bad_perms", f"perms: unknown keys {sorted(unknown)[:5]}; allowed: exp, nbf, cmds, vm")
    exp = _int_field(obj, "exp")
    if exp is None:
        raise TokenError("bad_perms", "perms: 'exp' (unix seconds) is required")
    nbf = _int_field(obj, "nbf")
    cmds: tuple[str, ...] | None = None
    if obj.get("cmds") is not None:
        raw = obj["cmds"]
        if (not isinstance(raw, list) or not raw or len(raw) > MAX_CMDS
                or not all(isinstance(c, str) and _CMD_RE.fullmatch(c) for c in raw)):
            raise TokenError("bad_perms", "perms: 'cmds' must be a non-empty list of command names")
        cmds = tuple(raw)
    vm = obj.get("vm")
    if vm is not None and (not isinstance(vm, str) or not _VM_RE.fullmatch(vm)):
        raise TokenError("bad_perms", "perms: 'vm' must be a VM name")
    return Perms(exp=exp, nbf=nbf, cmds=cmds, vm=vm)


def parse_stateless_token(token: str) -> StatelessToken:
    """Split and decode a usy0 token (the signature is not verified here: see :func:`verify_stateless`)."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != USY0:
        raise TokenError("malformed", "malformed usy0 token: expected usy0.<perms>.<signature>")
    try:
        perms_bytes, blob = b64url_decode(parts[1]), b64url_decode(parts[2])
    except ValueError:
        raise TokenError("malformed", "malformed usy0 token: the parts must be base64url") from None
    return StatelessToken(parse_perms(perms_bytes), perms_bytes, parse_sshsig(blob))


def check_times(perms: Perms, now: int) -> None:
    if perms.exp <= now:
        raise TokenError("expired", "the token has expired")
    if perms.nbf is not None and perms.nbf > now + NBF_LEEWAY:
        raise TokenError("not_yet_valid", "the token is not valid yet (nbf)")
    if perms.exp > now + int(MAX_USY0_LIFETIME.total_seconds()):
        raise TokenError("bad_perms", "perms: 'exp' is more than a year ahead; sign a shorter-lived token")


def verify_stateless(token: StatelessToken, registered_key: asyncssh.SSHKey) -> None:
    """Check namespace, key and signature against a *registered* key; raise TokenError if anything is off."""
    sig = token.sig
    if sig.namespace != SSHSIG_NAMESPACE:
        raise TokenError("bad_signature", f"signed with namespace {sig.namespace[:40]!r}; use -n {SSHSIG_NAMESPACE}")
    if not hmac.compare_digest(registered_key.public_data, sig.public_key):
        raise TokenError("unknown_key", "the signing key is not registered")
    try:
        sig_alg = _Reader(sig.signature).string()
    except ValueError:
        raise TokenError("bad_signature", "the signature is truncated") from None
    if sig_alg in _REFUSED_SIG_ALGS:
        raise TokenError("bad_signature", "RSA/SHA-1 signatures are refused; ssh-keygen signs with rsa-sha2-512")
    try:
        ok = registered_key.verify(sig.signed_data(token.perms_bytes), sig.signature)
    except Exception:  # a malformed inner signature is a bad signature, never a crash
        ok = False
    if not ok:
        raise TokenError("bad_signature", "the signature does not verify")


def token_kind(token: str) -> str | None:
    """``"usy1"``, ``"usy0"`` or None for anything else."""
    head = token[:5]
    if head == "usy1.":
        return USY1
    if head == "usy0.":
        return USY0
    return None
