"""Mail end to end with real SMTP on both sides: swaks, smtplib and aiosmtplib send into real VMs (read back over
``ssh vm@host``); an aiosmtpd relay started here records what the server sends (verification codes, mail from
VMs). Everything stays on loopback."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import smtplib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.controller import Controller

from ussycode.runtime.container import ContainerRuntime

from ..conftest import free_port  # noqa: TID252

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]
Server = Any  # tests/integration/conftest.py's Server


@pytest.fixture(autouse=True)
def _needs_container_runtime(test_image: object) -> None:
    check = ContainerRuntime.check()
    if not check.ok:
        pytest.skip(f"container runtime unavailable: {check.reason}")


@dataclass
class Relay:
    port: int
    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 OK"

    async def wait(self, count: int, timeout: float = 15) -> None:
        for _ in range(int(timeout * 20)):
            if len(self.messages) >= count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"relay got {len(self.messages)} messages, expected {count}")


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    r = Relay(free_port())
    controller = Controller(r, hostname="127.0.0.1", port=r.port)
    controller.start()
    yield r
    controller.stop()


def smtp_port(server: Server) -> int:
    assert server.app.smtp_port is not None
    return server.app.smtp_port


async def maildir(server: Server, key: Path, vm: str, expect: int, timeout: float = 20) -> list[str]:
    """File names in the VM's ~/Maildir/new once there are ``expect`` of them (read over ssh vm@host)."""
    names: list[str] = []
    for _ in range(int(timeout * 4)):
        r = await server.ssh(key, "ls -1 ~/Maildir/new 2>/dev/null || true", user=vm)
        names = r.stdout.split()
        if len(names) >= expect:
            return names
        await asyncio.sleep(0.25)
    raise AssertionError(f"{vm} has {len(names)} messages, expected {expect}")


async def swaks(port: int, to: str, *extra: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "swaks", "--to", to, "--from", "sender@example.test", "--server", f"127.0.0.1:{port}", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


def _send(port: int, to: str, data: bytes, sender: str, options: list[str]) -> Any:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo()
        if options:
            assert s.has_extn("8bitmime")
        return s.sendmail(sender, [to], data, mail_options=options)


async def send(port: int, to: str, data: bytes, sender: str = "sender@example.test",
               options: list[str] | None = None) -> Any:
    """smtplib (blocking) in a thread: the server under test runs on this loop."""
    return await asyncio.to_thread(_send, port, to, data, sender, options or [])


async def new_vm(server: Server, key: Path, name: str) -> None:
    r = await server.ssh(key, "new", f"--name={name}", "--disk=1", "--json")
    assert r.exit_status == 0, r


async def test_inbound_into_running_and_stopped_vms(server_factory: Callable[..., Any], tmp_path: Path) -> None:
    if shutil.which("swaks") is None:
        pytest.skip("swaks not installed (apt-get install swaks)")
    data = tmp_path / "data"
    server = await server_factory(data)
    port = smtp_port(server)
    alice = await server.register("alice")
    await new_vm(server, alice, "box1")
    # off by default: refused at RCPT, nothing lands
    rc, out = await swaks(port, "hello@box1.localhost")
    assert rc != 0 and "550" in out, out
    r = await server.ssh(alice, "share", "show", "box1", "--json")
    assert json.loads(r.stdout)["receive_email"] is False
    r = await server.ssh(alice, "share", "receive-email", "box1", "maybe")
    assert r.exit_status == 2 and "on or off" in r.stderr
    r = await server.ssh(alice, "share", "receive-email", "box1", "on")
    assert r.exit_status == 0 and "now delivered" in r.stdout, r
    assert json.loads((await server.ssh(alice, "share", "show", "box1", "--json")).stdout)["receive_email"] is True
    # the README's swaks line, word for word apart from the port
    rc, out = await swaks(port, "hello@box1.localhost", "--header", "Subject: first")
    assert rc == 0 and "250 OK: queued" in out, out
    names = await maildir(server, alice, "box1", 1)
    body = (await server.ssh(alice, f"cat ~/Maildir/new/{names[0]}", user="box1")).stdout
    assert "Delivered-To: hello@box1.localhost" in body and "X-Ussycode-VM: box1" in body and "Subject: first" in body
    owner = (await server.ssh(alice, f"stat -c %U ~/Maildir/new/{names[0]}", user="box1")).stdout.strip()
    assert owner == "ussycode"
    # unknown VM, wrong domain, hostile local part: 550, nothing spooled
    for bad in ("x@nosuchvm.localhost", "x@box1.example.com", "x@localhost", "a\"b@box1.localhost"):
        with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
            await send(port, bad, b"Subject: no\r\n\r\nno\r\n")
        assert next(iter(info.value.recipients.values()))[0] == 550
    # a stopped VM's mail waits and arrives when it starts; 8-bit, non-UTF-8 bytes arrive unchanged
    assert (await server.ssh(alice, "stop", "box1")).exit_status == 0
    raw = b"Subject: latin1\r\nX-Probe: eightbit\r\n\r\ncaf\xe9 \xff\xfe\r\n"
    await send(port, "Box@BOX1.localhost", raw, options=["BODY=8BITMIME"])
    assert (await server.ssh(alice, "start", "box1")).exit_status == 0
    names = await maildir(server, alice, "box1", 2)
    r = await server.ssh(alice, "grep -l 'X-Probe: eightbit' ~/Maildir/new/* | xargs tail -c 10 | od -An -tx1",
                         user="box1")
    assert "63 61 66 e9 20 ff fe 0d 0a" in " ".join(r.stdout.split()), r
    # ls -l shows the switch
    assert re.search(r"box1 .* on", (await server.ssh(alice, "ls", "-l")).stdout)
    # turning it off refuses again
    assert (await server.ssh(alice, "share", "receive-email", "box1", "off")).exit_status == 0
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        await send(port, "hello@box1.localhost", b"Subject: off\r\n\r\noff\r\n")


async def test_nothing_accepted_is_lost_across_a_server_restart(server_factory: Callable[..., Any],
                                                              tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = await server_factory(data)
    alice = await server.register("alice")
    await new_vm(server, alice, "keep1")
    assert (await server.ssh(alice, "share", "receive-email", "keep1", "on")).exit_status == 0
    assert (await server.ssh(alice, "stop", "keep1")).exit_status == 0
    await send(smtp_port(server), "a@keep1.localhost", b"Subject: survives\r\n\r\nkept\r\n")  # 250: spooled
    await server.app.stop()
    server = await server_factory(data)
    assert (await server.ssh(alice, "start", "keep1")).exit_status == 0
    names = await maildir(server, alice, "keep1", 1)
    assert "kept" in (await server.ssh(alice, f"cat ~/Maildir/new/{names[0]}", user="keep1")).stdout


async def test_limits_and_hostile_smtp(server_factory: Callable[..., Any], tmp_path: Path) -> None:
    server = await server_factory(tmp_path / "data", mail_per_hour=3)
    port = smtp_port(server)
    alice = await server.register("alice")
    await new_vm(server, alice, "lim1")
    assert (await server.ssh(alice, "share", "receive-email", "lim1", "on")).exit_status == 0
    # over 10 MB: 552 (declared with SIZE, and when sent without declaring it)
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 10600
    with pytest.raises(smtplib.SMTPSenderRefused) as sized:
        await send(port, "a@lim1.localhost", big)
    assert sized.value.smtp_code == 552
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def say(line: bytes) -> bytes:
        writer.write(line)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 10)

    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"220")
    await say(b"EHLO t\r\n")
    while not (await asyncio.wait_for(reader.readline(), 10)).startswith(b"250 "):
        pass
    assert (await say(b"RCPT TO:<a@lim1.localhost>\r\n")).startswith(b"503")  # before MAIL
    assert (await say(b"\x00\xff garbage\r\n")).startswith((b"500", b"502"))
    assert (await say(b"MAIL FROM:<s@example.test>\r\n")).startswith(b"250")
    assert (await say(b"RCPT TO:<a@lim1.localhost>\r\n")).startswith(b"250")
    assert (await say(b"DATA\r\n")).startswith(b"354")
    writer.write(b"Subject: raw\r\n\r\n" + b"y" * 900 + b"\r\n" * 3)
    writer.write((b"z" * 998 + b"\r\n") * 10_600 + b".\r\n")  # over 10 MB without declaring SIZE
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 30)).startswith(b"552")
    writer.close()
    # STARTTLS with the server's own certificate (for <domain> and *.<domain>), verified against it
    def over_tls() -> Any:
        context = ssl.create_default_context(cafile=str(server.data_dir / "mail" / "tls.pem"))
        context.check_hostname = False
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.starttls(context=context)
            return s.sendmail("s@example.test", ["a@lim1.localhost"], b"Subject: n0\r\n\r\nover TLS\r\n")

    assert await asyncio.to_thread(over_tls) == {}
    # per-hour limit (3): the fourth message is refused with 452 at RCPT
    for i in range(1, 3):
        await send(port, "a@lim1.localhost", f"Subject: n{i}\r\n\r\nbody\r\n".encode())
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        await send(port, "a@lim1.localhost", b"Subject: n4\r\n\r\nbody\r\n")
    assert next(iter(info.value.recipients.values()))[0] == 452
    await maildir(server, alice, "lim1", 3)


async def test_unread_limit_switches_receiving_off(server_factory: Callable[..., Any], tmp_path: Path) -> None:
    server = await server_factory(tmp_path / "data", mail_unread_limit=50)
    port = smtp_port(server)
    alice = await server.register("alice")
    await new_vm(server, alice, "many1")
    assert (await server.ssh(alice, "share", "receive-email", "many1", "on")).exit_status == 0

    async def one(i: int) -> Any:
        return await aiosmtplib.send(f"Subject: c{i}\r\n\r\nfrom sender {i}\r\n".encode(),
                                     sender=f"s{i}@example.test", recipients=["x@many1.localhost"],
                                     hostname="127.0.0.1", port=port, timeout=60, start_tls=False)

    results = await asyncio.gather(*(one(i) for i in range(50)))  # 50 concurrent senders
    assert all(r[1].startswith("OK") for r in results), results
    assert len(await maildir(server, alice, "many1", 50, timeout=60)) == 50
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as info:
        await one(51)
    assert info.value.recipients[0].code == 452
    listing = (await server.ssh(alice, "ls", "-l")).stdout
    assert "receiving switched off: 50 unread" in listing and "share receive-email many1 on" in listing
    assert json.loads((await server.ssh(alice, "share", "show", "many1", "--json")).stdout)["receive_email"] is False


async def test_a_symlinked_maildir_is_never_followed(server_factory: Callable[..., Any], tmp_path: Path) -> None:
    server = await server_factory(tmp_path / "data")
    alice = await server.register("alice")
    await new_vm(server, alice, "trap1")
    assert (await server.ssh(alice, "share", "receive-email", "trap1", "on")).exit_status == 0
    r = await server.ssh(alice, "mkdir -p /tmp/elsewhere && ln -s /tmp/elsewhere ~/Maildir", user="trap1")
    assert r.exit_status == 0, r
    await send(smtp_port(server), "a@trap1.localhost", b"Subject: trap\r\n\r\ntrap\r\n")
    mail = server.app.services.mail  # type: ignore[union-attr]
    vm = await server.app.services.vms.by_name("trap1")  # type: ignore[union-attr]
    assert vm is not None
    await asyncio.sleep(2)
    assert (await server.ssh(alice, "ls -A /tmp/elsewhere", user="trap1")).stdout == ""
    assert mail._count(vm.id) == 1  # kept, not lost
    assert (await server.ssh(alice, "rm ~/Maildir", user="trap1")).exit_status == 0
    mail.kick(vm.id)
    assert len(await maildir(server, alice, "trap1", 1)) == 1


async def test_addresses_and_mail_from_a_vm(server_factory: Callable[..., Any], tmp_path: Path,
                                            relay: Relay) -> None:
    server = await server_factory(tmp_path / "data", smtp_relay=f"127.0.0.1:{relay.port}",
                                  mail_from="noreply@ussy.test")
    alice = await server.register("alice")
    bob = await server.register("bob")

    async def verify(key: Path, address: str) -> None:
        before = len(relay.messages)
        r = await server.ssh(key, "email", "set", address)
        assert r.exit_status == 0, r
        await relay.wait(before + 1)
        _, rcpts, content = relay.messages[-1]
        assert rcpts == [address]
        code = re.search(rb"email verify ([0-9A-F]{4}-[0-9A-F]{4})", content)
        assert code is not None, content
        who = json.loads((await server.ssh(key, "whoami", "--json")).stdout)
        assert who["email"] == address and who["email_verified"] is False
        assert (await server.ssh(key, "email", "verify", "0000-0000")).exit_status != 0
        r = await server.ssh(key, "email", "verify", code.group(1).decode())
        assert r.exit_status == 0, r
        who = json.loads((await server.ssh(key, "whoami", "--json")).stdout)
        assert who["email"] == address and who["email_verified"] is True

    dave = await server.register("dave")
    await verify(alice, "me@example.test")
    await verify(bob, "bob@example.test")
    await verify(dave, "dave@example.test")
    r = await server.ssh(bob, "email", "set", "me@example.test")  # alice's: taken
    assert r.exit_status == 1 and "another account" in r.stderr
    for bad in ("not-an-address", "a@b\r\nBcc: x@y.test", "x" * 300 + "@example.test"):
        assert (await server.ssh(alice, "email", "set", bad)).exit_status != 0
    await new_vm(server, alice, "mailer")
    assert (await server.ssh(alice, "share", "add", "mailer", "bob")).exit_status == 0
    assert (await server.ssh(alice, "share", "add", "mailer", "Dave@example.test")).exit_status == 0  # by address

    async def post(payload: str) -> tuple[int, dict[str, Any]]:
        r = await server.ssh(alice, "curl -s -o /tmp/out -w '%{http_code}' -H 'Content-Type: application/json' "
                                    "--data-binary @- http://169.254.169.254/gateway/email/send; echo; cat /tmp/out",
                             user="mailer", stdin=payload.encode())
        status, _, body = r.stdout.partition("\n")
        return int(status), json.loads(body)

    r = await server.ssh(alice, "cat ~/AGENTS.md; curl -s http://169.254.169.254/", user="mailer")
    assert "gateway/email/send" in r.stdout and '"owner_email": "me@example.test"' in r.stdout, r
    status, doc = await post(json.dumps({"to": "me@example.test", "subject": "build done", "body": "all green"}))
    assert status == 200 and doc["status"] == "sent", doc
    await relay.wait(4)
    sender, rcpts, content = relay.messages[-1]
    assert rcpts == ["me@example.test"] and sender == "noreply@ussy.test"
    assert b"X-Ussycode-VM: mailer" in content and b"Subject: build done" in content and b"all green" in content
    status, _ = await post(json.dumps({"to": "Bob@Example.test", "subject": "hi", "body": "x", "html": "<b>x</b>"}))
    assert status == 200
    status, doc = await post(json.dumps({"to": "carol@example.test", "subject": "hi", "body": "x"}))
    assert status == 403, doc
    status, doc = await post(json.dumps({"to": "dave@example.test", "subject": "hi", "body": "x"}))
    assert status == 200, doc
    status, doc = await post(json.dumps({"to": "me@example.test", "subject": "a\r\nBcc: carol@example.test",
                                         "body": "x"}))
    assert status == 400, doc
    status, _ = await post(json.dumps({"to": "me@example.test\r\nBcc: carol@example.test", "subject": "s",
                                       "body": "x"}))
    assert status in (400, 403)
    for garbage in ("not json", "[]", json.dumps({"to": "me@example.test"}), json.dumps({"to": 1, "subject": "s",
                                                                                        "body": "b"})):
        assert (await post(garbage))[0] == 400
    assert (await post(json.dumps({"to": "me@example.test", "subject": "s", "body": "x" * 1_100_000})))[0] == 413
    assert all(b"carol" not in c for _, _, c in relay.messages)
    # 10 an hour per VM: 3 sent, 7 more pass, the next is 429
    for i in range(7):
        assert (await post(json.dumps({"to": "me@example.test", "subject": f"n{i}", "body": "x"})))[0] == 200
    status, doc = await post(json.dumps({"to": "me@example.test", "subject": "over", "body": "x"}))
    assert status == 429, doc
    # audit: recipient and subject, never the body
    rows = await server.app.services.store.read(  # type: ignore[union-attr]
        lambda c: __import__("ussycode.store.audit", fromlist=["recent"]).recent(c, 200))
    sends = [r for r in rows if r["action"] == "mail.send"]
    refused = [r for r in rows if r["action"] == "mail.refused"]
    assert len(sends) == 10 and sends[0]["detail"]["to"] and "body" not in sends[0]["detail"]
    assert any(r["detail"]["reason"] == "not_allowed" for r in refused)


async def test_without_a_relay_mail_out_is_503(server_factory: Callable[..., Any], tmp_path: Path) -> None:
    server = await server_factory(tmp_path / "data")
    alice = await server.register("alice")
    r = await server.ssh(alice, "email", "set", "me@example.test")
    assert r.exit_status == 1 and "--smtp-relay" in r.stderr
    await new_vm(server, alice, "norelay")
    r = await server.ssh(alice, "curl -s -o /dev/null -w '%{http_code}' -d '{\"to\":\"me@example.test\","
                                "\"subject\":\"s\",\"body\":\"b\"}' http://169.254.169.254/gateway/email/send",
                         user="norelay")
    assert r.stdout == "503", r

