"""usy0 tokens made with the real ssh-keygen by the recipe in the README, until the signing key is removed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.asyncio

DOCS = Path(__file__).resolve().parents[3] / "README.md"


def recipe() -> list[str]:
    """The three shell lines of the README recipe , so the docs are what is tested."""
    text = DOCS.read_text()
    block = re.search(r"<!-- usy0-recipe.*?-->\s*```sh\n(.*?)```", text, re.S)
    assert block, "the usy0 recipe block is missing from README.md"
    lines = block.group(1).strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("PERMS=") and "ssh-keygen -Y sign -n ussycode-api" in lines[1]
    return lines


def usy0(key: Path, perms: dict[str, object] | None = None, namespace: str = "ussycode-api",
         raw_perms: str | None = None) -> str:
    """Run the recipe with ``key`` (and, when given, these perms, or this exact JSON text, instead of the recipe's)."""
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen not installed")
    lines = recipe()
    if perms is not None:
        lines[0] = f"PERMS='{json.dumps(perms, separators=(',', ':'))}'"
    if raw_perms is not None:
        lines[0] = f"PERMS='{raw_perms}'"
    script = "\n".join(lines).replace("~/.ssh/id_ed25519", str(key)).replace("-n ussycode-api", f"-n {namespace}")
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script + '\nprintf %s "$TOKEN"'],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("usy0."), out
    return out.stdout


def fingerprint(key: Path) -> str:
    return subprocess.run(["ssh-keygen", "-lf", f"{key}.pub"], capture_output=True, text=True,
                          check=True).stdout.split()[1]


async def test_usy0_works_until_the_key_is_removed(server, api) -> None:
    first = await server.register("ivy")
    second = server.key("ivy-laptop")
    r = await server.ssh(first, "ssh-key", "add", Path(f"{second}.pub").read_text().strip())
    assert r.exit_status == 0, r

    token = usy0(second)  # the recipe as documented: cmds ls, whoami; a day long
    reply = await api.run(token, "whoami --json")
    assert reply["exit_code"] == 0 and json.loads(reply["output"])["handle"] == "ivy"
    assert json.loads((await api.run(token, "ls --json"))["output"]) == []
    r = await api.exec(token, "new --name=nope")
    assert r.status_code == 403 and "not permitted" in r.json()["error"]
    # a token signed by the other registered key works too, with its own perms
    full = usy0(first, {"exp": int(time.time()) + 600})
    assert (await api.run(full, "help"))["exit_code"] == 0

    r = await server.ssh(first, "ssh-key", "rm", fingerprint(second))
    assert r.exit_status == 0, r
    r = await api.exec(token, "whoami")
    assert r.status_code == 401 and "not registered" in r.json()["error"], r.text
    assert (await api.run(full, "whoami"))["exit_code"] == 0  # the other key's tokens are unaffected

    refused = await api.audit("token.refused")
    assert refused[0]["detail"]["reason"] == "unknown_key" and refused[0]["target"] == fingerprint(second)
    assert token.split(".")[2][:20] not in json.dumps(refused, default=str)


async def test_usy0_refusals(server, api) -> None:
    key = await server.register("jack")
    stranger = server.key("stranger")
    now = int(time.time())
    cases = [
        (usy0(key, {"exp": now - 5}), "expired"),
        (usy0(key, {"exp": now + 600, "nbf": now + 300}), "not_yet_valid"),
        (usy0(key, {"exp": now + 400 * 86400}), "bad_perms"),
        (usy0(key, {"exp": now + 600, "cmds": ["frobnicate"]}), "bad_perms"),
        (usy0(key, {"exp": now + 600, "vm": "not-mine"}), "bad_vm"),
        (usy0(key, {"exp": now + 600, "ctx": "jack"}), "bad_perms"),  # the original's format is not accepted
        (usy0(key, {"exp": now + 600}, namespace="git"), "bad_signature"),
        (usy0(stranger, {"exp": now + 600}), "unknown_key"),
    ]
    good = usy0(key, {"exp": now + 600})
    perms, sig = good.split(".")[1:]
    tampered = "usy0." + perms[:-2] + ("A" if perms[-2] != "A" else "B") + perms[-1] + "." + sig
    cases.append((tampered, None))  # tampered perms: bad JSON or a bad signature, refused either way
    for token, reason in cases:
        r = await api.exec(token, "whoami")
        assert r.status_code == 401, (reason, r.text)
        if reason:
            # audited, aggregated: a repeat of the same refusal from the same address folds into one row
            assert reason in {a["detail"]["reason"] for a in await api.audit("token.refused")}
    assert (await api.run(good, "whoami"))["exit_code"] == 0


async def test_usy0_with_a_duplicate_key_is_refused(server, api) -> None:
    """Signed perms that name a key twice are ambiguous (json keeps the last, another reader the first): 401."""
    key = await server.register("dupe")
    exp = int(time.time()) + 600
    for raw in (f'{{"exp":{exp},"cmds":["whoami"],"cmds":["whoami","new","rm"]}}',
                f'{{"exp":{exp},"exp":{exp + 100}}}',
                f'{{"exp":{exp},"vm":null,"vm":null}}',
                f'{{"exp":{exp},"\\u0063mds":["ls"],"cmds":["whoami"]}}'):
        token = usy0(key, raw_perms=raw)
        r = await api.exec(token, "whoami")
        assert r.status_code == 401, (raw, r.text)
        assert (await api.audit("token.refused"))[0]["detail"]["reason"] == "bad_perms"
    # the same perms without the duplicate, signed the same way, work
    token = usy0(key, raw_perms=f'{{"exp":{exp},"cmds":["whoami","new","rm"]}}')
    assert (await api.run(token, "whoami"))["exit_code"] == 0
