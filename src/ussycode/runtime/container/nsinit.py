"""The host-side helper that boots a container VM or runs a process in one (``python -m`` this module).

Why not bubblewrap: as root it always sets ``no_new_privs``, which breaks ``sudo`` in the guest. Why not
``unshare``/``nsenter`` + ``setpriv``: after entering the guest's mount namespace they would run a guest binary
with full capabilities (a guest that replaced ``setpriv`` would own the host). This helper is the host's own
Python: every import (and libseccomp) is loaded before it touches a namespace, and the capability bounding set is
reduced and the seccomp filter loaded before the first guest binary runs.

``boot``: join the VM's cgroups and network namespace, fork a child that makes the VM's **user namespace**; the
helper maps the VM's private id range into it (guest 0..N-1 = host ``id_base``..``id_base``+N-1), id-maps the
image and the VM's disk with it (``mount_setattr(MOUNT_ATTR_IDMAP)``: files keep guest ids on disk, nothing is
chowned) and mounts the overlay root as the guest's root (so the overlay's own work files map too). The child
then unshares mount/PID/UTS/IPC/cgroup namespaces owned by that user namespace and forks the guest's PID 1, which
mounts /proc (with /proc/sys read-only and lxcfs's files over meminfo, cpuinfo, stat, uptime…), a minimal /dev
(the host's null, zero, … bound in: a user namespace cannot make device nodes), /dev/shm and /run sized from the
VM's memory, pivots into the VM's root, drops capabilities, loads the seccomp filter and execs the guest init.
PID 1 runs with ``oom_score_adj`` -999 (the OOM killer takes it last). The helper writes PID 1's host pid to
``--pidfile`` and exits, so the VM is nobody's child and outlives the server.

``exec``: join a running VM's cgroups and namespaces (its user namespace last), drop capabilities, load the
filter, fork, switch to the user and exec. Exits with the process's status (128+signal when killed); the process
dies with the helper (parent-death signal).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import stat
import sys

from ussycode.runtime.container import caps
from ussycode.runtime.container.seccomp import Filter

GUEST_INIT = "/run/ussycode/init"
GUEST_META = "/run/ussycode/meta"
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
PROC_READONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
GUEST_MOUNT_POINTS = ("proc", "dev", "run")  # in the guest's tree; everything below them is ours (fresh mounts)
INIT_OOM_SCORE_ADJ = -999
BOOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
            "TERM": "linux", "container": "ussycode", "LANG": "C.UTF-8"}


def tmpfs_sizes(memory_mb: int) -> dict[str, int]:
    """Sizes in MiB of the VM's memory-backed file systems (pure): /dev/shm half its memory, /run a tenth
    (at least 16 MiB). Their pages are charged to the VM's memory cgroup, so a full /dev/shm fails writes with
    ENOSPC instead of starving the VM."""
    return {"shm": max(16, memory_mb // 2), "run": max(16, memory_mb // 10)}


def id_map_line(id_base: int, count: int) -> str:
    """The uid_map/gid_map text mapping guest ids 0..count-1 to host ``id_base``.. (pure)."""
    if id_base <= 0 or count < 1:
        raise ValueError("a VM's id range must be non-empty and start above host id 0")
    return f"0 {id_base} {count}\n"


def _protect_from_oom() -> None:
    """Inherited by PID 1: the OOM killer takes it last (init.sh raises its services to SERVICE_OOM_SCORE_ADJ).
    Lowering a score needs CAP_SYS_RESOURCE; a host without it keeps the inherited score, and the services' higher
    score still puts them first."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(INIT_OOM_SCORE_ADJ))
    except PermissionError:
        print(f"ussycode-boot: cannot lower init's oom_score_adj to {INIT_OOM_SCORE_ADJ} (no CAP_SYS_RESOURCE)",
              file=sys.stderr, flush=True)


def _join_cgroups(procs: list[str]) -> None:
    for path in procs:
        with open(path, "w") as f:
            f.write(str(os.getpid()))


def _become_namespace_root() -> None:
    """Switch to the user namespace's root (host ``id_base``). The capabilities the new namespace gave are kept.
    Until now the process was host uid 0 (unmapped in the namespace), the owner of the host directories on the
    way to the VM's root, which may be closed to others."""
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    os.setgroups([])


def _mount_dev(shm_mb: int) -> None:
    """/dev relative to the VM's root (the current directory): the host's device nodes are bound in (a user
    namespace cannot make device nodes), a new devpts, and /dev/shm sized from the VM's memory."""
    caps.mount("tmpfs", "dev", "tmpfs", caps.MS_NOSUID | caps.MS_NOEXEC, "mode=755,size=1024k")
    for name in DEV_NODES:
        open(f"dev/{name}", "w").close()
        caps.mount(f"/dev/{name}", f"dev/{name}", None, caps.MS_BIND)
    for name in ("pts", "shm"):
        os.mkdir(f"dev/{name}")
    caps.mount("devpts", "dev/pts", "devpts", caps.MS_NOSUID | caps.MS_NOEXEC,
               "newinstance,ptmxmode=0666,mode=0620,gid=5")
    caps.mount("tmpfs", "dev/shm", "tmpfs", caps.MS_NOSUID | caps.MS_NODEV, f"mode=1777,size={shm_mb}m")
    for name, target in (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"dev/{name}")


def _bind_readonly(source: str, target: str, extra: int = 0) -> None:
    caps.mount(source, target, None, caps.MS_BIND | caps.MS_REC)
    caps.mount(None, target, None,
               caps.MS_BIND | caps.MS_REMOUNT | caps.MS_RDONLY | caps.MS_NOSUID | caps.MS_NODEV | extra)


def _guest_pid1(args: argparse.Namespace, drop: list[int], seccomp: Filter, init_fd: int, meta_fd: int) -> None:
    sizes = tmpfs_sizes(args.memory_mb)
    caps.mount(None, "/", None, caps.MS_REC | caps.MS_PRIVATE)
    # The overlay root is a locked mount here (it came from the host's namespace): pivot_root needs a fresh bind.
    caps.mount(args.root, args.root, None, caps.MS_BIND | caps.MS_REC)
    os.chdir(args.root)
    _become_namespace_root()
    for target in GUEST_MOUNT_POINTS:
        # mount(2) follows symlinks, and until pivot_root an absolute one would lead into the host's tree.
        # Nothing of the guest runs yet, so this check cannot race.
        if not stat.S_ISDIR(os.lstat(target).st_mode):
            raise OSError(f"the VM's /{target} is not a directory (a symlink?): refusing to mount on it")
    # From here on every path is relative to the VM's root (or a host path anyone may traverse, or a descriptor).
    caps.mount("proc", "proc", "proc", caps.MS_NOSUID | caps.MS_NODEV | caps.MS_NOEXEC)
    for sub in PROC_READONLY:
        if os.path.exists(f"proc/{sub}"):
            _bind_readonly(f"proc/{sub}", f"proc/{sub}", caps.MS_NOEXEC)
    for name in args.lxcfs_proc:
        # lxcfs answers from the reader's cgroup and PID namespace: the VM's memory, CPUs, boot time.
        caps.mount(f"{args.lxcfs}/proc/{name}", f"proc/{name}", None, caps.MS_BIND)
    _mount_dev(sizes["shm"])
    caps.mount("tmpfs", "run", "tmpfs", caps.MS_NOSUID | caps.MS_NODEV, f"mode=755,size={sizes['run']}m")
    os.makedirs(f".{GUEST_META}", mode=0o755)
    open(f".{GUEST_INIT}", "w").close()
    caps.attach(init_fd, f".{GUEST_INIT}")
    caps.attach(meta_fd, f".{GUEST_META}")
    socket.sethostname(args.hostname)
    # pivot_root(".", ".") stacks the old root under the new one; detaching it leaves no way back to the host.
    caps.pivot_root(".", ".")
    caps.umount2(".", caps.MNT_DETACH)
    os.chdir("/")
    caps.drop_bounding_set(drop)
    seccomp.load()
    os.execve("/bin/bash", ["/bin/bash", GUEST_INIT], BOOT_ENV)  # noqa: S606


def _guest_child(args: argparse.Namespace, drop: list[int], seccomp: Filter, ready: int, go: int,
                 report: int) -> None:
    """The VM's first process: makes the user namespace, waits to be mapped, forks PID 1 and reports its pid."""
    init_fd = caps.detached_readonly_clone(args.init)
    meta_fd = caps.detached_readonly_clone(args.meta)
    caps.unshare(caps.CLONE_NEWUSER)
    os.write(ready, b"u")
    if os.read(go, 1) != b"g":
        os._exit(1)
    caps.unshare(caps.CLONE_NEWNS | caps.CLONE_NEWPID | caps.CLONE_NEWUTS | caps.CLONE_NEWIPC | caps.CLONE_NEWCGROUP)
    pid = os.fork()
    if pid == 0:
        try:
            _guest_pid1(args, drop, seccomp, init_fd, meta_fd)
        except BaseException as exc:  # report to the console log, never return into the parent's code
            print(f"ussycode-boot: {exc}", file=sys.stderr, flush=True)
            os._exit(127)
    os.write(report, str(pid).encode())
    os._exit(0)


def _mount_root(args: argparse.Namespace, userns_fd: int) -> None:
    """Id-map the image and the disk with the VM's user namespace and mount the overlay root on them."""
    for source, target, read_only in ((args.lower, args.lower_map, True), (args.disk, args.disk_map, False)):
        os.makedirs(target, mode=0o700, exist_ok=True)
        caps.idmapped_bind(source, target, userns_fd, read_only=read_only)
    os.makedirs(args.root, mode=0o755, exist_ok=True)
    options = f"lowerdir={args.lower_map},upperdir={args.disk_map}/upper,workdir={args.disk_map}/work"
    # overlayfs does its own work (work dir, copy-up, whiteouts) with the mounter's credentials: mount with the
    # guest root's file-system ids, or it could not write through the id-mapped disk (host root is unmapped).
    caps.set_fs_ids(args.id_base, args.id_base)
    try:
        caps.mount("overlay", args.root, "overlay", 0, options)
    finally:
        caps.set_fs_ids(0, 0)


def boot(args: argparse.Namespace) -> int:
    drop = caps.caps_to_drop(caps.last_cap())
    seccomp = Filter()  # built now, while the host's libseccomp is reachable; loaded by PID 1 before exec
    map_line = id_map_line(args.id_base, args.id_count)
    _join_cgroups(args.cgroup_procs)
    fd = os.open(args.netns, os.O_RDONLY)
    caps.setns(fd, caps.CLONE_NEWNET)
    os.close(fd)
    _protect_from_oom()
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    report_r, report_w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            _guest_child(args, drop, seccomp, ready_w, go_r, report_w)
        except BaseException as exc:
            print(f"ussycode-boot: {exc}", file=sys.stderr, flush=True)
        os._exit(127)
    for fd in (ready_w, go_r, report_w):
        os.close(fd)
    try:
        if os.read(ready_r, 1) != b"u":
            raise OSError("the VM's first process died before making its user namespace")
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{child}/{name}", "w") as f:
                f.write(map_line)
        userns = os.open(f"/proc/{child}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _mount_root(args, userns)
        finally:
            os.close(userns)
        os.write(go_w, b"g")
        pid_text = os.read(report_r, 32)
    except BaseException:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        raise
    os.waitpid(child, 0)
    if not pid_text:
        print("ussycode-boot: the VM's first process did not start PID 1", file=sys.stderr, flush=True)
        return 1
    tmp = f"{args.pidfile}.tmp"
    with open(tmp, "w") as f:
        f.write(pid_text.decode())
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
    seccomp = Filter()
    _join_cgroups(args.cgroup_procs)
    fds = [(os.open(f"/proc/{args.pid}/ns/{name}", os.O_RDONLY), flag) for name, flag in NAMESPACES]
    userns = os.open(f"/proc/{args.pid}/ns/user", os.O_RDONLY)
    # A VM booted before user namespaces were used shares the host's: joining it again is an error.
    own_userns = os.stat(userns).st_ino == os.stat("/proc/self/ns/user").st_ino
    # The host's root joins the VM's other namespaces (it is privileged over them all), the user namespace last.
    for fd, flag in fds:
        caps.setns(fd, flag)
        os.close(fd)
    if not own_userns:
        caps.setns(userns, caps.CLONE_NEWUSER)
    os.close(userns)
    caps.drop_bounding_set(drop)
    child = os.fork()
    if child == 0:
        try:
            caps.set_parent_death_signal(signal.SIGKILL)
            seccomp.load()
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
    for name in ("--root", "--lower", "--lower-map", "--disk", "--disk-map", "--hostname", "--netns", "--init",
                 "--meta", "--pidfile"):
        b.add_argument(name, required=True)
    b.add_argument("--id-base", type=int, required=True)
    b.add_argument("--id-count", type=int, required=True)
    b.add_argument("--memory-mb", type=int, required=True)
    b.add_argument("--lxcfs", default="")
    b.add_argument("--lxcfs-proc", action="append", default=[])
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
