"""Pure token code: durations, usy1 format and hashing, usy0 perms, SSHSIG parsing and verification."""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
import subprocess
import time
from pathlib import Path

import asyncssh
import pytest

from ussycode.auth import tokens as tk

NOW = 1_800_000_000


# --- durations --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [("30m", 1800), ("12h", 43200), ("7d", 604800), ("2w", 1209600),
                                               ("1y", 31536000), (" 1H ", 3600)])
def test_parse_duration(text: str, seconds: int) -> None:
    assert tk.parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0d", "10", "d", "1.5h", "-1d", "1s", "1 d", "11y", "999999d", "1dd"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        tk.parse_duration(text)


# --- usy1 -----------------------------------------------------------------------------------------------------------

def test_db_token_roundtrip_and_hash() -> None:
    new = tk.new_db_token()
    assert new.token.startswith(f"usy1.{new.id}.")
    ref = tk.parse_db_token(new.token)
    assert ref.id == new.id and len(ref.secret) == 43
    assert new.secret_hash == tk.hash_secret(ref.secret) and len(new.secret_hash) == 64
    assert ref.secret not in new.secret_hash
    assert tk.secret_matches(ref, new.secret_hash)
    other = tk.new_db_token()
    assert not tk.secret_matches(ref, other.secret_hash)
    assert other.id != new.id and other.token != new.token


@pytest.mark.parametrize("bad", ["usy1", "usy1.abc.def", "usy1.ABCDEFGHIJKL." + "a" * 43,
                                 "usy1.abcdefghijkl." + "a" * 42, "usy1.abcdefghijkl." + "a" * 43 + ".x",
                                 "usy1.abcdefghijkl." + "a" * 42 + "=", "usy1.abcdefghijkl." + "a" * 42 + "\n"])
def test_db_token_malformed(bad: str) -> None:
    with pytest.raises(tk.TokenError) as exc:
        tk.parse_db_token(bad)
    assert exc.value.reason == "malformed"


def test_token_kind() -> None:
    assert tk.token_kind("usy1.x") == "usy1"
    assert tk.token_kind("usy0.x") == "usy0"
    assert tk.token_kind("usy2.x") is None and tk.token_kind("") is None and tk.token_kind("usy1") is None


def test_b64url_tolerates_std_alphabet_and_padding() -> None:
    data = bytes(range(256))
    assert tk.b64url_decode(tk.b64url_encode(data)) == data
    assert tk.b64url_decode(base64.b64encode(data).decode()) == data
    for bad in ["", "a b", "ab$c", "a"]:
        with pytest.raises(ValueError):
            tk.b64url_decode(bad)


# --- usy0 perms ------------------------------------------------------------------------------------------------------

def test_parse_perms() -> None:
    p = tk.parse_perms(b'{"exp": 5, "nbf": 1, "cmds": ["ls", "whoami"], "vm": "api1"}')
    assert p == tk.Perms(exp=5, nbf=1, cmds=("ls", "whoami"), vm="api1")
    assert tk.parse_perms(b'{"exp": 5, "cmds": null, "vm": null}') == tk.Perms(exp=5)


@pytest.mark.parametrize("raw", [b"", b"[]", b'"x"', b"\xff", b"{}", b'{"exp": "5"}', b'{"exp": true}',
                                 b'{"exp": -1}', b'{"exp": 5.5}', b'{"exp": 5, "ctx": "me"}',
                                 b'{"exp": 5, "cmds": "ls"}', b'{"exp": 5, "cmds": []}', b'{"exp": 5, "cmds": [1]}',
                                 b'{"exp": 5, "cmds": ["LS"]}', b'{"exp": 5, "vm": "A"}', b'{"exp": 5, "vm": 3}',
                                 b'{"exp": 5, "nbf": "x"}'])
def test_parse_perms_rejects(raw: bytes) -> None:
    with pytest.raises(tk.TokenError) as exc:
        tk.parse_perms(raw)
    assert exc.value.reason == "bad_perms"


@pytest.mark.parametrize("raw", [b'{"exp": 5, "exp": 6}', b'{"exp": 5, "cmds": ["ls"], "cmds": ["rm"]}',
                                 b'{"vm": "a1b", "exp": 5, "vm": "b2c"}', b'{"exp": 5, "cmds": null, "cmds": null}',
                                 b'{"exp": 5, "vm": null, "x": {"a": 1, "a": 2}}', b'[{"exp": 5, "exp": 5}]',
                                 b'{"exp": 5, "\\u0065xp": 6}'])
def test_parse_perms_refuses_duplicate_keys(raw: bytes) -> None:
    """Ambiguous JSON (a key twice, at any depth, even spelled with an escape) is refused, never last-wins."""
    with pytest.raises(tk.TokenError) as exc:
        tk.parse_perms(raw)
    assert exc.value.reason == "bad_perms"
    assert "appears twice" in str(exc.value)


def test_check_times() -> None:
    tk.check_times(tk.Perms(exp=NOW + 60), NOW)
    tk.check_times(tk.Perms(exp=NOW + 60, nbf=NOW + 30), NOW)  # within the clock-skew leeway
    for perms, reason in [(tk.Perms(exp=NOW), "expired"), (tk.Perms(exp=NOW - 1), "expired"),
                          (tk.Perms(exp=NOW + 3600, nbf=NOW + 600), "not_yet_valid"),
                          (tk.Perms(exp=NOW + 400 * 86400), "bad_perms")]:
        with pytest.raises(tk.TokenError) as exc:
            tk.check_times(perms, NOW)
        assert exc.value.reason == reason


# --- SSHSIG ----------------------------------------------------------------------------------------------------

def _sign(key: asyncssh.SSHKey, perms: bytes, namespace: str = tk.SSHSIG_NAMESPACE, hash_alg: str = "sha512",
          sig_alg: bytes | None = None) -> str:
    """A usy0 token built in Python exactly as ssh-keygen -Y sign builds the SSHSIG blob."""
    unsigned = tk.SshSig(key.public_data, namespace, b"", hash_alg, b"")
    data = unsigned.signed_data(perms)
    signature = key.sign(data, sig_alg or key.algorithm)  # SSH encoding: string(alg) string(sig)
    blob = tk.encode_sshsig(tk.SshSig(key.public_data, namespace, b"", hash_alg, signature))
    return f"usy0.{tk.b64url_encode(perms)}.{tk.b64url_encode(blob)}"


@pytest.fixture(scope="module")
def ed_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


@pytest.mark.parametrize("alg", ["ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"])
@pytest.mark.parametrize("hash_alg", ["sha512", "sha256"])
def test_sshsig_verifies(alg: str, hash_alg: str) -> None:
    key = asyncssh.generate_private_key(alg, **({"key_size": 2048} if alg == "ssh-rsa" else {}))
    perms = json.dumps({"exp": NOW + 60, "cmds": ["ls"]}).encode()
    sig_alg = b"rsa-sha2-512" if alg == "ssh-rsa" else None
    token = tk.parse_stateless_token(_sign(key, perms, hash_alg=hash_alg, sig_alg=sig_alg))
    assert token.perms.cmds == ("ls",) and token.perms_bytes == perms
    assert token.sig.fingerprint == key.get_fingerprint("sha256")
    tk.verify_stateless(token, asyncssh.import_public_key(key.export_public_key()))


def test_sshsig_refusals(ed_key: asyncssh.SSHKey) -> None:
    pub = asyncssh.import_public_key(ed_key.export_public_key())
    perms = json.dumps({"exp": NOW + 60}).encode()

    def reason(token: str, key: asyncssh.SSHKey = pub) -> str:
        with pytest.raises(tk.TokenError) as exc:
            tk.verify_stateless(tk.parse_stateless_token(token), key)
        return exc.value.reason

    # another namespace (e.g. a git commit signature) is not an API token
    assert reason(_sign(ed_key, perms, namespace="git")) == "bad_signature"
    # tampered perms: same signature, different bytes
    good = _sign(ed_key, perms)
    forged = f"usy0.{tk.b64url_encode(json.dumps({'exp': NOW + 61}).encode())}.{good.split('.')[2]}"
    assert reason(forged) == "bad_signature"
    # a valid signature by a key other than the registered one
    other = asyncssh.generate_private_key("ssh-ed25519")
    assert reason(_sign(other, perms)) == "unknown_key"
    # RSA with SHA-1 signatures is refused even when the signature is good
    rsa = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    rsa_pub = asyncssh.import_public_key(rsa.export_public_key())
    assert reason(_sign(rsa, perms, sig_alg=b"ssh-rsa"), rsa_pub) == "bad_signature"
    # garbage inner signature
    blob = tk.encode_sshsig(tk.SshSig(ed_key.public_data, tk.SSHSIG_NAMESPACE, b"", "sha512", b"\x00\x00\x00\x01x"))
    assert reason(f"usy0.{tk.b64url_encode(perms)}.{tk.b64url_encode(blob)}") == "bad_signature"


@pytest.mark.parametrize("blob", [b"", b"SSHSIG", b"SSHSIG\x00\x00\x00\x02", b"XXXSIG\x00\x00\x00\x01",
                                  b"SSHSIG\x00\x00\x00\x01\xff\xff\xff\xff"])
def test_sshsig_malformed_blobs(blob: bytes) -> None:
    perms = tk.b64url_encode(b'{"exp": 5}')
    with pytest.raises(tk.TokenError) as exc:
        tk.parse_stateless_token(f"usy0.{perms}.{tk.b64url_encode(blob) or 'AA'}")
    assert exc.value.reason == "bad_signature"


def test_sshsig_unknown_hash_and_trailing_bytes(ed_key: asyncssh.SSHKey) -> None:
    sig = tk.SshSig(ed_key.public_data, tk.SSHSIG_NAMESPACE, b"", "md5", b"")
    with pytest.raises(tk.TokenError, match="md5"):
        tk.parse_sshsig(tk.encode_sshsig(sig))
    sig = tk.SshSig(ed_key.public_data, tk.SSHSIG_NAMESPACE, b"", "sha512", b"")
    with pytest.raises(tk.TokenError, match="trailing"):
        tk.parse_sshsig(tk.encode_sshsig(sig) + b"\x00")


@pytest.mark.parametrize("bad", ["usy0", "usy0.a", "usy0.a.b.c", "usy0..x", "usy0.$$.x", "usy1.a.b"])
def test_usy0_malformed(bad: str) -> None:
    with pytest.raises(tk.TokenError) as exc:
        tk.parse_stateless_token(bad)
    assert exc.value.reason == "malformed"


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa", "rsa"])
def test_real_ssh_keygen_signature(tmp_path: Path, key_type: str) -> None:
    """The documented shell lines, run with the real ssh-keygen, make a token that verifies."""
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-f", str(key)], check=True)
    perms = json.dumps({"exp": int(time.time()) + 3600, "cmds": ["whoami"]})
    script = (
        f"PERMS='{perms}'\n"
        f"SIG=$(printf %s \"$PERMS\" | ssh-keygen -Y sign -n ussycode-api -f {key} | sed '1d;$d' "
        "| tr -d '\\n=' | tr '+/' '-_')\n"
        "TOKEN=\"usy0.$(printf %s \"$PERMS\" | base64 | tr -d '\\n=' | tr '+/' '-_').$SIG\"\n"
        "printf %s \"$TOKEN\"\n"
    )
    token = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    parsed = tk.parse_stateless_token(token)
    assert parsed.perms.cmds == ("whoami",)
    tk.verify_stateless(parsed, asyncssh.read_public_key(str(key) + ".pub"))
    # the fingerprint is the one ssh-keygen shows
    shown = subprocess.run(["ssh-keygen", "-lf", str(key) + ".pub"], capture_output=True, text=True).stdout
    assert parsed.sig.fingerprint == shown.split()[1]
