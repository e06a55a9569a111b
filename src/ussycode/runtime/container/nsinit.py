"""The host-side helper that boots a container VM or runs a process in one (``python -m`` this module).

Why not bubblewrap: as root it always sets ``no_new_privs``, which breaks ``sudo`` in the guest. Why not
``unshare``/``nsenter`` + ``setpriv``: after entering the guest's mount namespace they would run a guest binary
with full capabilities (a guest that replaced ``setpriv`` would own the host). This helper is the host's own
Python: every import happens before it touches a namespace, and the capability bounding set is reduced before the
first guest binary runs.

``boot``: join the VM's cgroups and network namespace, unshare mount/PID/UTS/IPC/cgroup namespaces, fork the
guest's PID 1, which mounts /proc (with /proc/sys read-only), a minimal /dev and /run, pivots into the VM's root,
drops capabilities and execs the guest init. The helper writes PID 1's host pid to ``--pidfile`` and exits, so
the VM is nobody's child and outlives the server.

``exec``: join a running VM's cgroups and namespaces, drop capabilities, fork, switch to the user and exec.
Exits with the process's status (128+signal when killed); the process dies with the helper (parent-death signal).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from ussycode.runtime.container import caps

GUEST_INIT = "/run/ussycode/init"
GUEST_META = "/run/ussycode/meta"
DEV_NODES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}
PROC_READONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
BOOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
            "TERM": "linux", "container": "ussycode", "LANG": "C.UTF-8"}


def _join_cgroups(procs: list[str]) -> None:
    for path in procs:
        with open(path, "w") as f:
            f.write(str(os.getpid()))


def _mount_dev(dev: str) -> None:
    caps.mount("tmpfs", dev, "tmpfs", caps.MS_NOSUID | caps.MS_NOEXEC, "mode=755,size=1024k")
    for name, (major, minor) in DEV_NODES.items():
        path = f"{dev}/{name}"
        os.mknod(path, 0o666 | 0o020000, os.makedev(major, minor))
        os.chmod(path, 0o666)  # noqa: S103 (null, zero, tty… are world-usable)
    for name in ("pts", "shm"):
        os.mkdir(f"{dev}/{name}")
    caps.mount("devpts", f"{dev}/pts", "devpts", caps.MS_NOSUID | caps.MS_NOEXEC,
               "newinstance,ptmxmode=0666,mode=0620,gid=5")
    caps.mount("tmpfs", f"{dev}/shm", "tmpfs", caps.MS_NOSUID | caps.MS_NODEV, "mode=1777")
    for name, target in (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")


def _bind_readonly(source: str, target: str) -> None:
    caps.mount(source, target, None, caps.MS_BIND | caps.MS_REC)
    caps.mount(None, target, None, caps.MS_BIND | caps.MS_REMOUNT | caps.MS_RDONLY | caps.MS_NOSUID | caps.MS_NODEV)


def _guest_pid1(args: argparse.Namespace, drop: list[int]) -> None:
    root = args.root
    # The mount namespace is the guest's alone: pivot_root below re-roots every process of the namespace that
    # still sits on the old root, so the launcher (writing the pid file) must not share it.
    caps.unshare(caps.CLONE_NEWNS)
    caps.mount(None, "/", None, caps.MS_REC | caps.MS_PRIVATE)
    caps.mount(root, root, None, caps.MS_BIND | caps.MS_REC)
    caps.mount("proc", f"{root}/proc", "proc", caps.MS_NOSUID | caps.MS_NODEV | caps.MS_NOEXEC)
    for sub in PROC_READONLY:
        if os.path.exists(f"{root}/proc/{sub}"):
            _bind_readonly(f"{root}/proc/{sub}", f"{root}/proc/{sub}")
    _mount_dev(f"{root}/dev")
    caps.mount("tmpfs", f"{root}/run", "tmpfs", caps.MS_NOSUID | caps.MS_NODEV, "mode=755")
    os.makedirs(f"{root}{GUEST_META}", mode=0o755)
    open(f"{root}{GUEST_INIT}", "w").close()
    _bind_readonly(args.init, f"{root}{GUEST_INIT}")
    _bind_readonly(args.meta, f"{root}{GUEST_META}")
    socket.sethostname(args.hostname)
    # pivot_root(".", ".") stacks the old root under the new one; detaching it leaves no way back to the host.
    os.chdir(root)
    caps.pivot_root(".", ".")
    caps.umount2(".", caps.MNT_DETACH)
    os.chdir("/")
    caps.drop_bounding_set(drop)
    os.execve("/bin/bash", ["/bin/bash", GUEST_INIT], BOOT_ENV)  # noqa: S606


def boot(args: argparse.Namespace) -> int:
    drop = caps.caps_to_drop(caps.last_cap())
    _join_cgroups(args.cgroup_procs)
    fd = os.open(args.netns, os.O_RDONLY)
    caps.setns(fd, caps.CLONE_NEWNET)
    os.close(fd)
    caps.unshare(caps.CLONE_NEWPID | caps.CLONE_NEWUTS | caps.CLONE_NEWIPC | caps.CLONE_NEWCGROUP)
    pid = os.fork()
    if pid == 0:
        try:
            _guest_pid1(args, drop)
        except BaseException as exc:  # report to the console log, never return into the parent's code
            print(f"ussycode-boot: {exc}", file=sys.stderr, flush=True)
            os._exit(127)
    tmp = f"{args.pidfile}.tmp"
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.rename(tmp, args.pidfile)
    return 0


NAMESPACES = (("net", caps.CLONE_NEWNET), ("uts", caps.CLONE_NEWUTS), ("ipc", caps.CLONE_NEWIPC),
              ("cgroup", caps.CLONE_NEWCGROUP), ("pid", caps.CLONE_NEWPID), ("mnt", caps.CLONE_NEWNS))


def run_exec(args: argparse.Namespace) -> int:
    drop = caps.caps_to_drop(caps.last_cap())
    env = dict(item.split("=", 1) for item in args.env)
    groups = [int(g) for g in args.groups.split(",") if g]
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        print("nsinit exec: no command", file=sys.stderr)
        return 2
    _join_cgroups(args.cgroup_procs)
    fds = [(os.open(f"/proc/{args.pid}/ns/{name}", os.O_RDONLY), flag) for name, flag in NAMESPACES]
    caps.drop_bounding_set(drop)
    for fd, flag in fds:
        caps.setns(fd, flag)
        os.close(fd)
    child = os.fork()
    if child == 0:
        try:
            caps.set_parent_death_signal(signal.SIGKILL)
            os.setgroups(groups)
            os.setgid(args.gid)
            os.setuid(args.uid)
            try:
                os.chdir(args.cwd)
            except OSError:
                os.chdir("/")
            os.execvpe(argv[0], argv, env)  # noqa: S606
        except BaseException as exc:
            print(f"exec {argv[0]}: {exc}", file=sys.stderr, flush=True)
            os._exit(127)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: os.kill(child, signum))
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nsinit")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("boot")
    for name in ("--root", "--hostname", "--netns", "--init", "--meta", "--pidfile"):
        b.add_argument(name, required=True)
    b.add_argument("--cgroup-procs", action="append", default=[])
    e = sub.add_parser("exec")
    e.add_argument("--pid", type=int, required=True)
    e.add_argument("--uid", type=int, required=True)
    e.add_argument("--gid", type=int, required=True)
    e.add_argument("--groups", default="")
    e.add_argument("--cwd", default="/")
    e.add_argument("--env", action="append", default=[])
    e.add_argument("--cgroup-procs", action="append", default=[])
    e.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "boot":
        return boot(args)
    return run_exec(args)


if __name__ == "__main__":
    sys.exit(main())
