"""The public half of the routing table, as files Caddy checks on each request (no Caddy change per VM).

Caddy's static config serves a host without asking the app server when ``<base>/public/<host>`` exists (a
regular file: Caddy's ``file`` matcher) and then dials ``unix/<base>/sockets/<host>``, a symlink to the VM's
forwarder socket. Every other host goes through forward-auth, which names the upstream itself. So making a VM
public or private, renaming, starting or stopping it is a couple of ``rename(2)``/``unlink(2)`` calls here:
in-flight requests, downloads and WebSockets of every VM are never touched.

Order keeps each step safe: the socket link is in place before its marker appears, and the marker goes before
the link. A Caddy this server starts runs in ``<base>`` and dials the relative ``unix/sockets/<host>``, so a long
data dir does not matter; an attached Caddy dials the absolute path, and a host whose path would not fit in a
unix socket address (107 bytes) is left out there (it is still served, through forward-auth).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from ussycode.proxy.routes import valid_host

log = logging.getLogger(__name__)

MAX_UNIX_PATH = 107


class PublicHosts:
    """``<base>/public/<host>`` markers and ``<base>/sockets/<host>`` links for public hosts of running VMs."""

    def __init__(self, base: Path, *, relative: bool = False) -> None:
        """``relative``: Caddy runs with ``base`` as its working directory (a Caddy this server starts)."""
        self.base = Path(base)
        self.markers = self.base / "public"
        self.sockets = self.base / "sockets"
        self.relative = relative

    @property
    def _dial_dir(self) -> Path:
        return Path(self.sockets.name) if self.relative else self.sockets

    def dial_template(self, placeholder: str = "{http.request.host}") -> str:
        return f"unix/{self._dial_dir}/{placeholder}"

    def fits(self, host: str) -> bool:
        return len(str(self._dial_dir / host)) <= MAX_UNIX_PATH

    def current(self) -> dict[str, str]:
        """host -> socket path for every host served on the fast path now."""
        result: dict[str, str] = {}
        if not self.markers.is_dir():
            return result
        for marker in self.markers.iterdir():
            with contextlib.suppress(OSError):
                result[marker.name] = os.readlink(self.sockets / marker.name)
        return result

    def sync(self, wanted: Mapping[str, Path | str]) -> None:
        """Make the public hosts exactly ``wanted`` (host -> the forwarder socket it dials)."""
        for d in (self.base, self.markers, self.sockets):
            d.mkdir(parents=True, exist_ok=True)
        want = {h: str(p) for h, p in wanted.items() if valid_host(h) and self.fits(h)}
        for host in sorted(set(wanted) - set(want)):
            log.debug("public host %s served through forward-auth (name too long for the fast path)", host)
        have = {m.name for m in self.markers.iterdir()}
        for host in sorted(have - set(want)):
            with contextlib.suppress(FileNotFoundError):
                (self.markers / host).unlink()
            with contextlib.suppress(FileNotFoundError):
                (self.sockets / host).unlink()
        for host, target in sorted(want.items()):
            link = self.sockets / host
            try:
                same = os.readlink(link) == target
            except OSError:
                same = False
            if not same:
                tmp = self.sockets / f".{host}.tmp"
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                tmp.symlink_to(target)
                tmp.replace(link)  # atomic: a request sees the old socket or the new one
            marker = self.markers / host
            if not marker.exists():
                marker.touch()
        # Links without a marker (a crash between steps) are dead weight: drop them.
        for link in self.sockets.iterdir():
            if link.name not in want:
                with contextlib.suppress(FileNotFoundError):
                    link.unlink()

    def clear(self) -> None:
        self.sync({})
