"""Core-loop figures (container runtime), each against a baseline measured in the same run.

- ``new`` → SSH-ready, p50/p95 over 20 VMs, vs a bare bubblewrap start of the same image's sshd (to banner).
- Lobby round trip ``ssh host whoami`` vs OpenSSH ``ssh localhost true`` against a stock sshd.
- Host memory per idle running VM beyond the guest's own processes (server growth + pasta) vs the guest's own.
- 200 concurrent lobby sessions: server RSS and ``whoami`` p99 while held, vs idle.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import asyncssh

from bench.common import percentile, row, write
from bench.server import IMAGES, BenchServer, free_port, rss_kb
from ussycode.runtime import netns
from ussycode.runtime.images import ImageStore

N_VMS = int(os.environ.get("BENCH_VMS", "20"))
N_SESSIONS = int(os.environ.get("BENCH_SESSIONS", "200"))


def bare_bwrap_start(rootfs: Path, runs: int) -> list[float]:
    """Time from spawning bubblewrap with the image's sshd (own netns) until sshd sends its banner."""
    times = []
    tmp = Path(tempfile.mkdtemp(prefix="ussy-bare-", dir="/var/tmp"))
    hostkey = tmp / "hostkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)], check=True)
    for i in range(runs):
        ns = f"ussy-bench-{os.getpid() % 10000}-{i}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        argv = ["ip", "netns", "exec", ns, "bwrap", "--ro-bind", str(rootfs), "/", "--proc", "/proc",
                "--dev", "/dev", "--tmpfs", "/run", "--tmpfs", "/tmp", "--ro-bind", str(hostkey), "/run/hostkey",
                "--unshare-pid", "--unshare-uts", "--unshare-ipc", "--die-with-parent", "--",
                "/bin/sh", "-c", "mkdir -p /run/sshd && exec /usr/sbin/sshd -D -e -o HostKey=/run/hostkey "
                "-o PidFile=none"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    sock = netns.connect_in_netns(ns, "127.0.0.1", 22, 1.0)
                    sock.setblocking(True)
                    sock.settimeout(5)
                    if sock.recv(64).startswith(b"SSH-"):
                        times.append(time.perf_counter() - t0)
                        sock.close()
                        break
                    sock.close()
                except OSError:
                    time.sleep(0.005)
                if time.perf_counter() - t0 > 30:
                    raise RuntimeError("bare sshd did not start")
        finally:
            proc.terminate()
            proc.wait(10)
            subprocess.run(["ip", "netns", "del", ns], check=False)
    return times


def stock_sshd(tmp: Path, user_key: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    hostkey = tmp / "sshd_hostkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)], check=True)
    auth = tmp / "authorized_keys"
    auth.write_text(Path(str(user_key) + ".pub").read_text())
    os.chmod(auth, 0o600)
    cfg = tmp / "sshd_config"
    cfg.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {hostkey}\nAuthorizedKeysFile {auth}\n"
                   "PermitRootLogin prohibit-password\nUsePAM no\nPidFile none\nStrictModes no\n"
                   "PasswordAuthentication no\nKbdInteractiveAuthentication no\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)], stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, port


def timed(argv: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True, timeout=60)
        out.append(time.perf_counter() - t0)
    return out


async def new_times(srv: BenchServer, key: Path, n: int) -> list[float]:
    times = []
    async with asyncssh.connect("127.0.0.1", srv.ssh_port, username="lobby", client_keys=[str(key)],
                                known_hosts=None, agent_path=None, config=[]) as conn:
        for i in range(n):
            t0 = time.perf_counter()
            res = await conn.run(f"new --name=bench{i:02d}x --disk=1 --json")
            if res.exit_status != 0:
                raise RuntimeError(f"new failed: {res.stderr}")
            times.append(time.perf_counter() - t0)
    return times


def vm_processes(db: Path) -> list[dict[str, int | None]]:
    con = sqlite3.connect(db)
    rows = [json.loads(r[0]) for r in con.execute("select runtime_state from vms where status='running'")]
    con.close()
    return rows


def cgroup_rss_kb(vm_pid: int) -> int:
    """The guest's own memory: RSS of every process in the VM's PID namespace."""
    ns = os.readlink(f"/proc/{vm_pid}/ns/pid")
    total = 0
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.readlink(p / "ns" / "pid") == ns:
                    total += rss_kb(int(p.name))
            except OSError:
                continue
    return total


async def session_load(srv: BenchServer, keys: list[Path], n: int) -> tuple[float, float, int, int]:
    def whoami_p99(k: Path) -> float:
        return percentile(timed(srv.ssh_argv(k, "whoami"), 30), 99)

    assert srv.proc is not None
    idle_p99 = await asyncio.to_thread(whoami_p99, keys[0])
    idle_rss = rss_kb(srv.proc.pid)
    conns, procs = [], []
    for i in range(n):
        conn = await asyncssh.connect("127.0.0.1", srv.ssh_port, username="lobby",
                                      client_keys=[str(keys[i % len(keys)])], known_hosts=None, agent_path=None,
                                      config=[])
        proc = await conn.create_process(term_type="xterm")
        await proc.stdout.readuntil("ussy> ")
        conns.append(conn)
        procs.append(proc)
    held_rss = rss_kb(srv.proc.pid)
    held_p99 = await asyncio.to_thread(whoami_p99, keys[0])
    for conn in conns:
        conn.close()
    return idle_p99, held_p99, idle_rss, held_rss


def main() -> None:
    image = ImageStore(IMAGES).resolve("ussyuntu-mini")
    srv = BenchServer().start()
    rows, notes = [], []
    tmp = Path(tempfile.mkdtemp(prefix="ussy-bench-sshd-", dir="/var/tmp"))
    sshd = None
    try:
        key = srv.key("bench")
        assert srv.ssh(key, "register", "bench").returncode == 0
        # 1. new -> SSH-ready vs bare bubblewrap sshd start
        bare = bare_bwrap_start(image.rootfs, N_VMS)
        assert srv.proc is not None
        rss_before = rss_kb(srv.proc.pid)
        news = asyncio.run(new_times(srv, key, N_VMS))
        p50, p95, b50 = percentile(news, 50), percentile(news, 95), percentile(bare, 50)
        rows.append(row("new -> ssh-ready p50 (container)", p50, "s", "bare bwrap sshd p50", b50,
                        "p50 < 1 s and <= 1.5x", p50 < 1 and p50 / b50 <= 1.5))
        rows.append(row("new -> ssh-ready p95 (container)", p95, "s", "bare bwrap sshd p95", percentile(bare, 95)))
        # 3. host memory per idle VM beyond the guest's own processes
        states = vm_processes(Path(srv.env["USSYCODE_DATA_DIR"]) / "ussycode.db")
        base_rss = rss_kb(srv.proc.pid)
        egress = [rss_kb(int(s["egress_pid"])) for s in states if s.get("egress_pid")]
        guest = [cgroup_rss_kb(int(s["pid"])) for s in states if s.get("pid")]
        server_per_vm = max(0.0, (base_rss - rss_before) / max(len(states), 1))  # server growth per VM
        per_vm_host = (sum(egress) / max(len(states), 1)) + server_per_vm
        rows.append(row("host memory per idle VM (slirp4netns + server)", per_vm_host / 1024, "MB",
                        "guest's own processes", (sum(guest) / max(len(guest), 1)) / 1024, "< 20 MB",
                        per_vm_host / 1024 < 20))
        notes.append(f"{len(states)} VMs running; server RSS {base_rss / 1024:.1f} MB with all of them")
        # 2. lobby round trip vs stock OpenSSH
        sshd, sshd_port = stock_sshd(tmp, key)
        ours = timed(srv.ssh_argv(key, "whoami"), 20)
        stock = timed(["ssh", "-p", str(sshd_port), "-i", str(key), "-o", "IdentitiesOnly=yes", "-o",
                       "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                       "-o", "LogLevel=ERROR", "-F", "/dev/null", "root@127.0.0.1", "true"], 20)
        r50, s50 = percentile(ours, 50), percentile(stock, 50)
        rows.append(row("lobby 'ssh host whoami' p50", r50, "s", "'ssh localhost true' stock sshd", s50,
                        "<= 2x", r50 / s50 <= 2))
        # 4. concurrent lobby sessions
        keys = [srv.key(f"s{i}") for i in range(10)]
        for i, k in enumerate(keys):
            srv.ssh(k, "register", f"sess{i}")
        idle_p99, held_p99, idle_rss, held_rss = asyncio.run(session_load(srv, keys, N_SESSIONS))
        rows.append(row(f"whoami p99 with {N_SESSIONS} sessions held", held_p99, "s", "whoami p99 idle", idle_p99))
        rows.append(row(f"server RSS with {N_SESSIONS} sessions held", held_rss / 1024, "MB", "server RSS idle",
                        idle_rss / 1024))
        notes.append(f"server RSS per held session: {(held_rss - idle_rss) / max(N_SESSIONS, 1):.0f} kB")
        for i in range(N_VMS):
            srv.ssh(key, "rm", f"bench{i:02d}x", "--yes")
    finally:
        if sshd:
            sshd.terminate()
        srv.cleanup()
    write("core", rows, notes)


if __name__ == "__main__":
    main()
