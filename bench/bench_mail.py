"""Inbound mail, against aiosmtpd writing each message to a plain host directory (same machine, same run).

- messages/s into one running VM (10 KB messages, 8 concurrent senders): from the first connection until every
  message is a file in the VM's ~/Maildir/new (read over ``ssh vm@host``) — vs the same senders against an aiosmtpd
  whose handler writes each message to a host directory (and fsyncs it before 250, as an MTA does and as our
  spool does). Goal: >= 50%.
- the server's memory while 200 SMTP connections are held open (each past EHLO), against the same server idle.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtpd.controller import Controller

from bench.common import row, write
from bench.server import BenchServer, free_port, rss_kb

N_MESSAGES = int(os.environ.get("BENCH_MAIL_MESSAGES", "1000"))
SENDERS = 8
CONNECTIONS = 200
MESSAGE = b"Subject: bench\r\nFrom: s@example.test\r\n\r\n" + (b"x" * 98 + b"\r\n") * 100  # ~10 KB


class _ToDirectory:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.n = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.n += 1
        # as an MTA does before it says 250 (and as ussycode's spool does): the file is on disk
        fd = os.open(self.directory / f"{self.n}.eml", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, envelope.original_content)
            os.fsync(fd)
        finally:
            os.close(fd)
        return "250 OK"


async def _send_all(port: int, rcpt: str, n: int) -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def sender() -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=60)
        await client.connect()
        try:
            while not queue.empty():
                queue.get_nowait()
                await client.sendmail("s@example.test", [rcpt], MESSAGE)
        finally:
            await client.quit()

    await asyncio.gather(*(sender() for _ in range(SENDERS)))


def baseline_rate(n: int) -> float:
    directory = Path(tempfile.mkdtemp(prefix="ussy-bench-mail-", dir="/var/tmp"))
    port = free_port()
    controller = Controller(_ToDirectory(directory), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        started = time.perf_counter()
        asyncio.run(_send_all(port, "x@example.test", n))
        return n / (time.perf_counter() - started)
    finally:
        controller.stop()


def delivered(srv: BenchServer, key: Path, vm: str) -> int:
    r = srv.ssh(key, "ls -A ~/Maildir/new 2>/dev/null | wc -l", user=vm)
    return int(r.stdout.strip() or 0)


def ours_rate(srv: BenchServer, key: Path, smtp_port: int, n: int, notes: list[str]) -> float:
    started = time.perf_counter()
    asyncio.run(_send_all(smtp_port, "x@mailb.localhost", n))
    notes.append(f"all {n} accepted (250, spooled) after {time.perf_counter() - started:.2f} s")
    while delivered(srv, key, "mailb") < n:
        if time.perf_counter() - started > 600:
            raise RuntimeError("mail was not delivered within 10 minutes")
        time.sleep(0.25)  # each look is an ssh session: do not slow the server down by looking
    return n / (time.perf_counter() - started)


async def _hold(port: int, count: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writer.write(b"EHLO bench\r\n")
        while not (await reader.readline()).startswith(b"250 "):
            pass
        writers.append(writer)
    return writers


def held_memory(pid: int, port: int) -> tuple[int, int]:
    async def run() -> tuple[int, int]:
        idle = rss_kb(pid)
        writers = await _hold(port, CONNECTIONS)
        await asyncio.sleep(1)
        held = rss_kb(pid)
        for w in writers:
            w.close()
        return idle, held

    return asyncio.run(run())


def main() -> None:
    smtp_port = free_port()
    srv = BenchServer(USSYCODE_SMTP_ADDR=f"127.0.0.1:{smtp_port}", USSYCODE_MAIL_PER_HOUR="1000000",
                      USSYCODE_MAIL_UNREAD_LIMIT="1000000").start()
    rows, notes = [], []
    try:
        key = srv.key("mail")
        assert srv.ssh(key, "register", "mailer").returncode == 0
        assert srv.ssh(key, "new", "--name=mailb", "--disk=1").returncode == 0
        assert srv.ssh(key, "share", "receive-email", "mailb", "on").returncode == 0
        base = baseline_rate(N_MESSAGES)
        ours = ours_rate(srv, key, smtp_port, N_MESSAGES, notes)
        rows.append(row(f"inbound msgs/s into a VM ({SENDERS} senders, 10 KB)", ours, "msg/s",
                        "aiosmtpd to a host dir", base, ">= 50%", ours / base >= 0.5))
        assert srv.proc is not None
        idle, held = held_memory(srv.proc.pid, smtp_port)
        rows.append(row(f"server RSS with {CONNECTIONS} SMTP connections", held / 1024, "MB", "server RSS idle",
                        idle / 1024))
        notes.append(f"baseline: {N_MESSAGES} messages in {N_MESSAGES / base:.2f} s; ours is counted until every "
                     "message is a file in the VM "
                     f"(spooled with fsync, then moved in by batches); per held connection "
                     f"{(held - idle) / CONNECTIONS:.0f} kB")
        srv.ssh(key, "rm", "mailb", "--yes")
    finally:
        srv.cleanup()
    write("mail", rows, notes)


if __name__ == "__main__":
    main()
