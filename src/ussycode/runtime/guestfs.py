"""The one way host code touches a path inside a VM's file system: resolved inside the VM's root, never the host's.

A guest controls every name below its root: any component may be a symlink (absolute or full of ``..``) aimed at
a host directory, or a mount point. Plain ``open(root / "etc/passwd")`` follows those with the host's root, so a
guest could make the host read, write or delete host files. Every function here resolves with ``openat2``:

- ``RESOLVE_IN_ROOT``: absolute symlinks and ``..`` are resolved as if ``root`` were ``/`` (as the guest sees them);
- ``RESOLVE_NO_MAGICLINKS``: no ``/proc/<pid>/fd``-style jumps;
- ``RESOLVE_NO_XDEV``: no crossing into another mount (a guest's bind of a host file, its ``/proc``);
- ``strict=True`` adds ``RESOLVE_NO_SYMLINKS``: every component must be a real directory or file.

Writes never follow a final symlink and never create through one; unlinks remove a name in a directory resolved
the same way. ``root`` is a path the host controls (the VM's disk mount, ``/proc/<pid>/root``) or an open
directory descriptor.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import stat
from collections.abc import Iterator

SYS_OPENAT2 = 437  # x86_64
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_IN_ROOT = 0x10
DEFAULT_RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
MAX_READ = 4 * 2**20


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _openat2(dirfd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, resolve)
    while True:
        fd = int(_libc.syscall(SYS_OPENAT2, dirfd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EAGAIN and err != errno.EINTR:  # EAGAIN: a rename raced the lookup; try again
            raise OSError(err, os.strerror(err), path)


def _relative(path: str) -> str:
    """``path`` as the guest wrote it, relative to its root ('' for the root itself). NUL is refused."""
    if "\0" in path:
        raise ValueError("path contains NUL")
    return path.lstrip("/") or "."


@contextlib.contextmanager
def root_fd(root: str | os.PathLike[str] | int) -> Iterator[int]:
    """An ``O_PATH`` descriptor of ``root`` (opened by the host: the root itself is the host's to name)."""
    if isinstance(root, int):
        yield root
        return
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def open_in(root: str | os.PathLike[str] | int, path: str, flags: int = os.O_RDONLY, mode: int = 0o644, *,
            strict: bool = False) -> int:
    """A descriptor of ``path`` resolved inside ``root`` (see the module docstring). The caller closes it."""
    resolve = DEFAULT_RESOLVE | (RESOLVE_NO_SYMLINKS if strict else 0)
    with root_fd(root) as rfd:
        return _openat2(rfd, _relative(path), flags, mode, resolve)


def read_bytes(root: str | os.PathLike[str] | int, path: str, *, limit: int = MAX_READ, strict: bool = False) -> bytes:
    """The contents of a regular file ``path`` inside ``root`` (at most ``limit`` bytes; a FIFO or device is
    refused, so a guest cannot make the host block or read a device)."""
    fd = open_in(root, path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY, strict=strict)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        chunks, size = [], 0
        while size < limit:
            chunk = os.read(fd, min(65536, limit - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(root: str | os.PathLike[str] | int, path: str, *, strict: bool = False) -> str:
    return read_bytes(root, path, strict=strict).decode(errors="replace")


def write_bytes(root: str | os.PathLike[str] | int, path: str, data: bytes, mode: int = 0o644, *,
                strict: bool = True) -> None:
    """Create or replace the regular file ``path`` inside ``root``; a final symlink is refused (``O_NOFOLLOW``),
    and so (``strict``, the default) is a symlink anywhere on the way."""
    fd = open_in(root, path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK, mode,
                 strict=strict)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.ftruncate(fd, 0)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _parent(root: str | os.PathLike[str] | int, path: str, strict: bool) -> tuple[int, str]:
    rel = _relative(path).rstrip("/")
    head, _, name = rel.rpartition("/")
    if name in ("", ".", ".."):
        raise ValueError(f"{path!r} names no file")
    return open_in(root, head or ".", os.O_PATH | os.O_DIRECTORY, strict=strict), name


def unlink(root: str | os.PathLike[str] | int, path: str, *, strict: bool = False) -> bool:
    """Remove the name ``path`` inside ``root`` (a symlink itself, never its target). False if it was missing."""
    dfd, name = _parent(root, path, strict)
    try:
        os.unlink(name, dir_fd=dfd)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(dfd)


def listdir(root: str | os.PathLike[str] | int, path: str, *, strict: bool = False) -> list[str]:
    fd = open_in(root, path, os.O_RDONLY | os.O_DIRECTORY, strict=strict)
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)
