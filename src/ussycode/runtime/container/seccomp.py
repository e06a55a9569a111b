"""The container VMs' seccomp policy (pure data) and a thin ctypes binding to Debian's libseccomp that loads it.

Policy: an allow-list, as Docker's default profile: every system call not listed fails with ``EPERM``. The list is
Docker's unconditional list, plus what it grants for the capabilities a guest keeps (``chroot`` for SYS_CHROOT) and
``ptrace``/``process_vm_*`` (Docker allows them on kernels >= 4.8, so ``strace`` of one's own processes works).
Stricter than Docker in two places:

- ``io_uring_*`` are refused (a large, often-exploited kernel surface; libuv, Python and glibc fall back).
- Nested user namespaces are refused: ``clone`` with any namespace flag and ``unshare``/``setns`` fail with EPERM,
  ``clone3`` with ENOSYS (its flags live in memory a filter cannot read, so libc falls back to ``clone``). A guest
  user could otherwise get a full capability set in a namespace of its own (``unshare -Ur``) and reach kernel code
  (netfilter, mounts of many file systems) that is otherwise root-only; rootless podman or bubblewrap inside a VM
  is the price.

Refused, among others: ``keyctl``/``add_key``/``request_key`` (the kernel keyring is not namespaced), ``bpf``,
``perf_event_open``, ``userfaultfd``, module, clock, ``kexec``, ``reboot``, ``swapon``, ``open_by_handle_at``,
``mount`` and the new mount API, ``acct``, ``quotactl``, ``lookup_dcookie``, ``fanotify_init``, socket family
AF_VSOCK. The filter covers x86_64 and its i386/x32 ABIs (as Docker's).

``no_new_privs`` is not set (``sudo`` must work): the filter is loaded by the guest's still-privileged launcher.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_mod
from dataclasses import dataclass

# Docker's default profile: the calls allowed without conditions (io_uring_* removed, see the module docstring).
ALLOWED: tuple[str, ...] = (
    "accept", "accept4", "access", "adjtimex", "alarm", "bind", "brk", "capget", "capset", "chdir", "chmod",
    "chown", "chown32", "clock_adjtime", "clock_adjtime64", "clock_getres", "clock_getres_time64",
    "clock_gettime", "clock_gettime64", "clock_nanosleep", "clock_nanosleep_time64", "close", "close_range",
    "connect", "copy_file_range", "creat", "dup", "dup2", "dup3", "epoll_create", "epoll_create1", "epoll_ctl",
    "epoll_ctl_old", "epoll_pwait", "epoll_pwait2", "epoll_wait", "epoll_wait_old", "eventfd", "eventfd2",
    "execve", "execveat", "exit", "exit_group", "faccessat", "faccessat2", "fadvise64", "fadvise64_64",
    "fallocate", "fanotify_mark", "fchdir", "fchmod", "fchmodat", "fchown", "fchown32", "fchownat", "fcntl",
    "fcntl64", "fdatasync", "fgetxattr", "flistxattr", "flock", "fork", "fremovexattr", "fsetxattr", "fstat",
    "fstat64", "fstatat64", "fstatfs", "fstatfs64", "fsync", "ftruncate", "ftruncate64", "futex", "futex_time64",
    "futex_waitv", "futimesat", "getcpu", "getcwd", "getdents", "getdents64", "getegid", "getegid32", "geteuid",
    "geteuid32", "getgid", "getgid32", "getgroups", "getgroups32", "getitimer", "getpeername", "getpgid",
    "getpgrp", "getpid", "getppid", "getpriority", "getrandom", "getresgid", "getresgid32", "getresuid",
    "getresuid32", "getrlimit", "get_robust_list", "getrusage", "getsid", "getsockname", "getsockopt",
    "get_thread_area", "gettid", "gettimeofday", "getuid", "getuid32", "getxattr", "inotify_add_watch",
    "inotify_init", "inotify_init1", "inotify_rm_watch", "io_cancel", "ioctl", "io_destroy", "io_getevents",
    "io_pgetevents", "io_pgetevents_time64", "ioprio_get", "ioprio_set", "io_setup", "io_submit", "ipc", "kill",
    "landlock_add_rule", "landlock_create_ruleset", "landlock_restrict_self", "lchown", "lchown32", "lgetxattr",
    "link", "linkat", "listen", "listxattr", "llistxattr", "_llseek", "lremovexattr", "lseek", "lsetxattr",
    "lstat", "lstat64", "madvise", "membarrier", "memfd_create", "memfd_secret", "mincore", "mkdir", "mkdirat",
    "mknod", "mknodat", "mlock", "mlock2", "mlockall", "mmap", "mmap2", "mprotect", "mq_getsetattr", "mq_notify",
    "mq_open", "mq_timedreceive", "mq_timedreceive_time64", "mq_timedsend", "mq_timedsend_time64", "mq_unlink",
    "mremap", "msgctl", "msgget", "msgrcv", "msgsnd", "msync", "munlock", "munlockall", "munmap",
    "name_to_handle_at", "nanosleep", "newfstatat", "_newselect", "open", "openat", "openat2", "pause",
    "pidfd_open", "pidfd_send_signal", "pipe", "pipe2", "pkey_alloc", "pkey_free", "pkey_mprotect", "poll",
    "ppoll", "ppoll_time64", "prctl", "pread64", "preadv", "preadv2", "prlimit64", "process_mrelease", "pselect6",
    "pselect6_time64", "pwrite64", "pwritev", "pwritev2", "read", "readahead", "readlink", "readlinkat", "readv",
    "recv", "recvfrom", "recvmmsg", "recvmmsg_time64", "recvmsg", "remap_file_pages", "removexattr", "rename",
    "renameat", "renameat2", "restart_syscall", "rmdir", "rseq", "rt_sigaction", "rt_sigpending",
    "rt_sigprocmask", "rt_sigqueueinfo", "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait",
    "rt_sigtimedwait_time64", "rt_tgsigqueueinfo", "sched_getaffinity", "sched_getattr", "sched_getparam",
    "sched_get_priority_max", "sched_get_priority_min", "sched_getscheduler", "sched_rr_get_interval",
    "sched_rr_get_interval_time64", "sched_setaffinity", "sched_setattr", "sched_setparam", "sched_setscheduler",
    "sched_yield", "seccomp", "select", "semctl", "semget", "semop", "semtimedop", "semtimedop_time64", "send",
    "sendfile", "sendfile64", "sendmmsg", "sendmsg", "sendto", "setfsgid", "setfsgid32", "setfsuid",
    "setfsuid32", "setgid", "setgid32", "setgroups", "setgroups32", "setitimer", "setpgid", "setpriority",
    "setregid", "setregid32", "setresgid", "setresgid32", "setresuid", "setresuid32", "setreuid", "setreuid32",
    "setrlimit", "set_robust_list", "setsid", "setsockopt", "set_thread_area", "set_tid_address", "setuid",
    "setuid32", "setxattr", "shmat", "shmctl", "shmdt", "shmget", "shutdown", "sigaltstack", "signalfd",
    "signalfd4", "sigprocmask", "sigreturn", "socketcall", "socketpair", "splice", "stat", "stat64", "statfs",
    "statfs64", "statx", "symlink", "symlinkat", "sync", "sync_file_range", "syncfs", "sysinfo", "tee", "tgkill",
    "time", "timer_create", "timer_delete", "timer_getoverrun", "timer_gettime", "timer_gettime64",
    "timer_settime", "timer_settime64", "timerfd_create", "timerfd_gettime", "timerfd_gettime64",
    "timerfd_settime", "timerfd_settime64", "times", "tkill", "truncate", "truncate64", "ugetrlimit", "umask",
    "uname", "unlink", "unlinkat", "utime", "utimensat", "utimensat_time64", "utimes", "vfork", "vmsplice",
    "wait4", "waitid", "waitpid", "write", "writev",
    # Docker: kernel >= 4.8 (strace, gdb of one's own processes); x86: arch_prctl, modify_ldt; CAP_SYS_CHROOT.
    "ptrace", "process_vm_readv", "process_vm_writev", "arch_prctl", "modify_ldt", "chroot",
)

# Never allowed, whatever the list above says (checked by a unit test; documents the intent).
DENIED: frozenset[str] = frozenset({
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "init_module", "finit_module",
    "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "settimeofday",
    "clock_settime", "clock_settime64", "stime", "open_by_handle_at", "mount", "umount2", "fsopen", "fsmount",
    "fsconfig", "fspick", "move_mount", "open_tree", "mount_setattr", "pivot_root", "unshare", "setns", "acct",
    "quotactl", "quotactl_fd", "lookup_dcookie", "fanotify_init", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "iopl", "ioperm", "syslog", "vhangup", "sethostname", "setdomainname", "nfsservctl",
    "kcmp", "pidfd_getfd", "process_madvise", "get_mempolicy", "set_mempolicy", "mbind", "move_pages",
    "clone3",
})

CLONE_NEW_FLAGS = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET (Docker's mask)
AF_VSOCK = 40
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)  # Docker's: PER_LINUX, UNAME26, ADDR_NO_RANDOMIZE, query

# scmp_compare
CMP_NE, CMP_EQ, CMP_MASKED_EQ = 1, 4, 7


@dataclass(frozen=True)
class ArgCmp:
    """``args[index] <op> value`` (MASKED_EQ: ``args[index] & value == value_b``)."""

    index: int
    op: int
    value: int
    value_b: int = 0


@dataclass(frozen=True)
class Rule:
    syscall: str
    errno: int | None = None  # None: allow
    args: tuple[ArgCmp, ...] = ()


def policy() -> list[Rule]:
    """Every rule of the filter (pure); the default action for anything else is EPERM."""
    rules = [Rule(name) for name in ALLOWED]
    rules.append(Rule("socket", args=(ArgCmp(0, CMP_NE, AF_VSOCK),)))
    rules += [Rule("personality", args=(ArgCmp(0, CMP_EQ, p),)) for p in PERSONALITIES]
    rules.append(Rule("clone", args=(ArgCmp(0, CMP_MASKED_EQ, CLONE_NEW_FLAGS, 0),)))
    rules.append(Rule("clone3", errno=errno_mod.ENOSYS))
    return rules


# --- libseccomp (Debian's libseccomp2) ---------------------------------------------------------------------

ACT_ALLOW = 0x7FFF0000
FLTATR_CTL_NNP = 3
EXTRA_ARCHES = ("x86", "x32")


def act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmpC(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


class SeccompError(OSError):
    pass


def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise SeccompError(errno_mod.ENOENT,
                           f"libseccomp is not installed (apt-get install libseccomp2): {exc}") from exc
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmpC)]
    return lib


class Filter:
    """A compiled filter, built while host libraries are reachable and loaded later (just before ``exec``)."""

    def __init__(self, rules: list[Rule] | None = None) -> None:
        self._lib = _lib()
        ctx = self._lib.seccomp_init(act_errno(errno_mod.EPERM))
        if not ctx:
            raise SeccompError(errno_mod.ENOMEM, "seccomp_init failed")
        self._ctx = ctx
        self._check(self._lib.seccomp_attr_set(ctx, FLTATR_CTL_NNP, 0), "disabling no_new_privs")
        for arch in EXTRA_ARCHES:
            token = self._lib.seccomp_arch_resolve_name(arch.encode())
            if token:
                rc = self._lib.seccomp_arch_add(ctx, token)
                if rc not in (0, -errno_mod.EEXIST):
                    self._check(rc, f"adding architecture {arch}")
        for rule in rules if rules is not None else policy():
            self._add(rule)

    def _add(self, rule: Rule) -> None:
        nr = self._lib.seccomp_syscall_resolve_name(rule.syscall.encode())
        if nr == -1:  # __NR_SCMP_ERROR: no such call on any architecture libseccomp knows
            return
        action = ACT_ALLOW if rule.errno is None else act_errno(rule.errno)
        cmps = (_ArgCmpC * max(1, len(rule.args)))()
        for i, a in enumerate(rule.args):
            cmps[i] = _ArgCmpC(a.index, a.op, a.value, a.value_b)
        rc = self._lib.seccomp_rule_add_array(self._ctx, action, nr, len(rule.args), cmps)
        # -EDOM/-EINVAL: the call or comparison does not exist on one of the architectures; skip it there.
        if rc not in (0, -errno_mod.EDOM, -errno_mod.EEXIST):
            self._check(rc, f"adding the rule for {rule.syscall}")

    @staticmethod
    def _check(rc: int, what: str) -> None:
        if rc < 0:
            raise SeccompError(-rc, f"seccomp: {what}: {errno_mod.errorcode.get(-rc, str(-rc))}")

    def load(self) -> None:
        """Install the filter on the calling thread (needs CAP_SYS_ADMIN in its user namespace: no NNP)."""
        self._check(self._lib.seccomp_load(self._ctx), "loading the filter")

    def release(self) -> None:
        if self._ctx:
            self._lib.seccomp_release(self._ctx)
            self._ctx = None
