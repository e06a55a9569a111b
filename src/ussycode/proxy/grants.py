"""Signed-in visitors on the fast path: a grant is one of forward-auth's allows, kept where Caddy can check it.

A browser signed in on a VM host would cost a forward-auth round trip on every request. When forward-auth lets a
signed-in request through (the owner, a person the VM is shared with, a signed-in visitor of a public URL), it
also makes a *grant*: a cookie (``__Host-ussy_grant``, host-only) whose value spells the access, the visitor's
id, handle and email, the VM and port, and a MAC over them, the session and the host (HMAC-SHA256 with a key made
at each start); and a file ``<grants>/<host>/<value>``. Caddy's ``ussycode-grants`` route
(:func:`ussycode.proxy.front.build_grants_route`) takes a request whose grant cookie is well formed and whose
file exists straight to the VM port's bridge, with the identity headers spelled by the cookie: one file opened per
request, no Python.

The file is the permission, the cookie only names it (a changed letter names no file; the MAC makes a name
nobody can guess). A file lives until any write to the database (the store's generation moves: a share removed,
a session revoked, a VM stopped, renamed or removed, an account suspended — :meth:`Grants.wipe` removes every
file before the write's caller goes on), until the session's expiry, or for as long as forward-auth's own
answers may be replayed, whichever comes first; and it is made only if no write happened since forward-auth
read what it decided on. A request whose file is gone takes forward-auth again, which decides afresh.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import heapq
import hmac
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Collection
from pathlib import Path

from ussycode.proxy.routes import valid_host

log = logging.getLogger(__name__)

GRANT_COOKIE = "ussy_grant"
GRANT_HEADER = "X-Ussy-Grant"  # forward-auth's answer: a Set-Cookie value Caddy adds to the client's response
REGEXP_NAME = "ussy_grant"  # Caddy's placeholders: {http.regexp.ussy_grant.<group>}
ACCESSES = ("owner", "shared", "public")
# The cookie's value (RE2 and Python alike); every part is checked before a grant is made, so nothing in a file
# name or a dial address can be a path separator, a dot-dot or a glob character.
VALUE_RE = (
    r"(?P<access>owner|shared|public)~(?P<user>[0-9a-f]{16})~(?P<handle>[a-z0-9-]{1,20})~(?P<vm>[0-9a-f]{16})"
    r"~(?P<port>[0-9]{1,5})~(?P<addr>(?:240\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3})?)"
    r"~(?P<email>[A-Za-z0-9._+@-]{0,128})~(?P<mac>[A-Za-z0-9_-]{43})"
)
_VALUE = re.compile(VALUE_RE)
MAX_NAME = 255  # a file name
# Caddy (perhaps another user, for an attached one) looks names up in these directories; nobody may list them,
# and a name is a MAC nobody can guess.
DIR_MODE = 0o711


def cookie_name(secure: bool) -> str:
    return f"__Host-{GRANT_COOKIE}" if secure else GRANT_COOKIE


def cookie_re(secure: bool, parts: Collection[str] | None = None) -> str:
    """The grant cookie in a Cookie header, its value captured as ``value`` and its ``parts`` by name (all of
    them if None; the others are matched the same way, uncaptured: Caddy makes four placeholders of every group,
    about a microsecond each per request)."""
    value = VALUE_RE
    if parts is not None:
        value = re.sub(r"\(\?P<([a-z]+)>", lambda m: m[0] if m[1] in parts else "(?:", value)
    return r"(?:^|;)[ \t]*" + re.escape(cookie_name(secure)) + r"=(?P<value>" + value + r")[ \t]*(?:;|$)"


class Grants:
    """``<root>/<host>/<value>``: the grants Caddy checks. Use from the event loop only."""

    def __init__(self, root: Path, key: bytes, generation: Callable[[], int]) -> None:
        self.root = Path(root)
        self._key = key
        self._generation = generation
        self._until: dict[tuple[str, str], float] = {}
        self._expiry: list[tuple[float, str, str]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._wiped = 0
        self.broken = False  # a wipe failed: make no grant until restart (fail closed)

    def reset(self) -> None:
        """Start empty (a previous server's grants, made with another key, are gone)."""
        self._forget()
        shutil.rmtree(self.root, ignore_errors=True)
        for old in self.root.parent.glob(self.root.name + ".old-*"):
            shutil.rmtree(old, ignore_errors=True)
        self.root.mkdir(parents=True, mode=DIR_MODE)
        os.chmod(self.root, DIR_MODE)

    def value(self, *, session: str, host: str, access: str, user_id: str, handle: str, email: str | None,
              vm_id: str, port: int, addr: str = "") -> str | None:
        """The grant cookie's value for this allow (None if it cannot be spelled: the request keeps using
        forward-auth). ``addr``: the VM port's routed address (:mod:`ussycode.proxy.links`), which Caddy then
        dials instead of the port's bridge."""
        fields = f"{access}~{user_id}~{handle}~{vm_id}~{port}~{addr}~{email or ''}"
        mac = hmac.new(self._key, f"{session}\0{host}\0{fields}".encode(), hashlib.sha256).digest()
        value = fields + "~" + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
        if not 1 <= port <= 65535 or len(value) > MAX_NAME or not _VALUE.fullmatch(value):
            return None
        return value

    def admit(self, host: str, value: str, generation: int, until: float) -> bool:
        """Make the grant ``host``/``value`` until ``until`` (monotonic), if nothing was written to the database
        since ``generation`` (what the allow was decided on is still what the database says)."""
        if (self.broken or generation != self._generation() or until <= time.monotonic() or not valid_host(host)
                or not _VALUE.fullmatch(value)):
            return False
        folder = self.root / host
        try:
            with contextlib.suppress(FileExistsError):
                folder.mkdir(mode=DIR_MODE)
            fd = os.open(folder / value, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.close(fd)
        except OSError as exc:
            log.warning("grant for %s not made: %s", host, exc)
            return False
        key = (host, value)
        if self._until.get(key, 0.0) < until:
            self._until[key] = until
            heapq.heappush(self._expiry, (until, host, value))
            self._schedule()
        return True

    def wipe(self) -> None:
        """Remove every grant now (the database changed): the directory is renamed away in one step, so from
        here on no grant Caddy could find was made before the change; the files go in the background."""
        if not self._until:
            return
        self._forget()
        self._wiped += 1
        old = self.root.with_name(f"{self.root.name}.old-{self._wiped}")
        try:
            os.rename(self.root, old)
            self.root.mkdir(mode=DIR_MODE)
            os.chmod(self.root, DIR_MODE)
        except OSError as exc:
            self.broken = True
            log.error("grants could not be removed (%s); signed-in visitors go through forward-auth", exc)
            shutil.rmtree(self.root, ignore_errors=True)
            return
        try:
            asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, old, True)
        except RuntimeError:  # no loop (shutting down)
            shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        self._forget()
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def count(self) -> int:
        return len(self._until)

    def _forget(self) -> None:
        self._until.clear()
        self._expiry.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._expiry:
            delay = max(0.0, self._expiry[0][0] - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = time.monotonic()
        while self._expiry and self._expiry[0][0] <= now:
            until, host, value = heapq.heappop(self._expiry)
            if self._until.get((host, value)) != until:
                continue  # renewed since
            del self._until[(host, value)]
            with contextlib.suppress(FileNotFoundError):
                (self.root / host / value).unlink()
        self._schedule()
