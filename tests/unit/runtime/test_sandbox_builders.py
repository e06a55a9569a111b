"""The container sandbox's pure parts and its path-safety helper: seccomp policy, id ranges, tmpfs sizes, cpusets,
lxcfs mount detection, and guestfs against symlinks and ``..`` planted at every step."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest

from ussycode.runtime import guestfs, idmap, lxcfs
from ussycode.runtime.cgroups import CgroupLimits, cgroup_values, pick_cpus
from ussycode.runtime.container import nsinit, seccomp

# --- seccomp --------------------------------------------------------------------------------------------------


def test_policy_allows_none_of_the_denied_calls() -> None:
    allowed_plain = {r.syscall for r in seccomp.policy() if r.errno is None and not r.args}
    assert not allowed_plain & seccomp.DENIED
    # The list, and Docker's: never allowed unconditionally.
    for name in ("keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "kexec_load",
                 "init_module", "finit_module", "open_by_handle_at", "clock_settime", "io_uring_setup",
                 "unshare", "setns", "mount", "clone3"):
        assert name not in allowed_plain


def test_clone_is_allowed_only_without_namespace_flags() -> None:
    (clone,) = [r for r in seccomp.policy() if r.syscall == "clone"]
    (cmp,) = clone.args
    assert (cmp.op, cmp.value, cmp.value_b) == (seccomp.CMP_MASKED_EQ, seccomp.CLONE_NEW_FLAGS, 0)
    assert seccomp.CLONE_NEW_FLAGS & 0x10000000  # CLONE_NEWUSER: no nested user namespaces
    (clone3,) = [r for r in seccomp.policy() if r.syscall == "clone3"]
    assert clone3.errno == errno.ENOSYS  # libc falls back to clone, whose flags the filter can see


def test_docker_allowed_calls_that_dev_tools_need_are_allowed() -> None:
    allowed = {r.syscall for r in seccomp.policy() if r.errno is None}
    assert {"ptrace", "process_vm_readv", "setresuid", "setgroups", "chroot", "execve", "socket", "personality",
            "seccomp", "prctl", "capset"} <= allowed


def _syscall_errno(nr: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.syscall(nr, 0, 0, 0, 0, 0) == -1:
        return ctypes.get_errno()
    return 0


@pytest.mark.skipif(os.geteuid() != 0, reason="loading a filter without no_new_privs needs root")
def test_loaded_filter_refuses_with_eperm() -> None:
    flt = seccomp.Filter()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the filter is for life: load it in a child
        try:
            flt.load()
            results = [_syscall_errno(nr) for nr in (250, 248, 321, 298, 425, 272)]  # keyctl add_key bpf perf
            os.write(write_fd, repr(results).encode())                             # io_uring_setup unshare
        finally:
            os._exit(0)
    os.close(write_fd)
    out = os.read(read_fd, 1000).decode()
    os.waitpid(pid, 0)
    assert out == repr([errno.EPERM] * 6)
    flt.release()


# --- id ranges, sizes, cpusets ----------------------------------------------------------------------------------


def test_id_ranges_do_not_overlap_and_start_above_host_ids() -> None:
    bases = [idmap.base_of_slot(s) for s in range(5)]
    assert bases[0] == idmap.FIRST_HOST_ID > 100000 + 65536 * 100
    assert all(b - a == idmap.RANGE for a, b in zip(bases, bases[1:], strict=False))
    assert idmap.base_of_slot(idmap.MAX_SLOTS - 1) + idmap.RANGE - 1 <= 2**32 - 2
    assert idmap.first_free_base([]) == bases[0]
    assert idmap.first_free_base([bases[0], bases[2], None]) == bases[1]
    assert idmap.slot_of_base(bases[3]) == 3
    with pytest.raises(ValueError):
        idmap.slot_of_base(bases[0] + 1)


def test_id_map_line() -> None:
    assert nsinit.id_map_line(16777216, 65536) == "0 16777216 65536\n"
    with pytest.raises(ValueError):
        nsinit.id_map_line(0, 65536)  # never map guest root to host root


def test_tmpfs_sizes_follow_memory() -> None:
    assert nsinit.tmpfs_sizes(512) == {"shm": 256, "run": 51}
    assert nsinit.tmpfs_sizes(64) == {"shm": 32, "run": 16}


def test_pick_cpus() -> None:
    assert pick_cpus(1, 2, 0) == "0"
    assert pick_cpus(1, 2, 3) == "1"
    assert pick_cpus(2, 4, 3) == "0,3"
    assert pick_cpus(2, 2, 0) is None  # as many as the host: no pinning
    v1 = cgroup_values("v1", CgroupLimits(cpu=1, memory_mb=256, cpus="1"))
    assert v1["cpuset"] == {"cpuset.cpus": "1"}
    assert cgroup_values("v2", CgroupLimits(cpu=1, memory_mb=256, cpus="0"))[""]["cpuset.cpus"] == "0"
    assert "cpuset" not in cgroup_values("v1", CgroupLimits(cpu=1, memory_mb=256))


def test_lxcfs_mount_detection() -> None:
    info = ("36 25 0:33 / /var/lib/lxcfs rw,nosuid,nodev,relatime shared:1 - fuse.lxcfs lxcfs rw,user_id=0\n"
            "37 25 0:34 / /var/lib/other rw - tmpfs tmpfs rw\n")
    assert lxcfs.mount_fstype(info, Path("/var/lib/lxcfs")) == "fuse.lxcfs"
    assert lxcfs.mount_fstype(info, Path("/var/lib/nope")) is None
    assert lxcfs.lxcfs_argv(Path("/x"), Path("/p"))[-1] == "/x"


# --- guestfs: the host never follows a guest's path -------------------------------------------------------------


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, Path]:
    """A guest root full of traps aimed at a host directory with canaries."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret").write_text("host secret\n")
    (host / "ssh_host_ed25519_key").write_text("host key\n")
    root = tmp_path / "guest"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("ussycode:x:1000:1000::/home/ussycode:/bin/bash\n")
    (root / "etc/ssh").symlink_to(host)                      # absolute symlink to the host
    (root / "etc/profile.d").symlink_to("../../host")         # relative, climbing out
    (root / "home/u").mkdir(parents=True)
    (root / "home/u/.ssh").symlink_to(f"/../../../../{host}")  # '..' past the root
    (root / "shadow").symlink_to(host / "secret")             # final component
    (root / "dotdot").mkdir()
    os.mkfifo(root / "fifo")
    return root, host


def _snapshot(host: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(host.iterdir())}


def test_guestfs_reads_inside_the_root(planted: tuple[Path, Path]) -> None:
    root, host = planted
    assert guestfs.read_text(root, "/etc/passwd").startswith("ussycode:")
    assert guestfs.read_text(root, "dotdot/../../../../etc/passwd").startswith("ussycode:")  # '..' stays inside
    for path in ("/etc/ssh/secret", "/etc/profile.d/secret", "/home/u/.ssh/secret", "/shadow"):
        with pytest.raises(OSError) as exc:
            guestfs.read_text(root, path)  # resolved in the guest's root: no such file there
        assert exc.value.errno in (errno.ENOENT, errno.ELOOP, errno.EXDEV)
    with pytest.raises(OSError) as exc:
        guestfs.read_text(root, "/shadow", strict=True)  # strict: no symlink at all, even one that stays inside
    assert exc.value.errno == errno.ELOOP
    with pytest.raises(OSError) as exc:
        guestfs.read_bytes(root, "/fifo")  # no blocking on a FIFO the guest left
    assert exc.value.errno == errno.EINVAL


def test_guestfs_writes_and_unlinks_never_leave_the_root(planted: tuple[Path, Path]) -> None:
    root, host = planted
    before = _snapshot(host)
    for path in ("/etc/ssh/ssh_host_ed25519_key", "/etc/profile.d/ussycode.sh", "/home/u/.ssh/authorized_keys",
                 "/shadow", "/etc/ssh/../ssh/secret"):
        with pytest.raises(OSError):
            guestfs.write_bytes(root, path, b"pwned\n")
    for path in ("/etc/ssh/ssh_host_ed25519_key", "/etc/profile.d/secret", "/home/u/.ssh/secret"):
        with pytest.raises(OSError):
            guestfs.unlink(root, path)
    assert guestfs.unlink(root, "/shadow") is True  # removes the guest's symlink itself, not the host file
    assert _snapshot(host) == before
    guestfs.write_bytes(root, "/etc/motd", b"hello\n")
    assert (root / "etc/motd").read_text() == "hello\n"
    assert "motd" in guestfs.listdir(root, "/etc")
    with pytest.raises(ValueError):
        guestfs.unlink(root, "/")
