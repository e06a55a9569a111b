"""The public half of the routing table: a listening socket per public host, which Caddy dials by host name.

Caddy's static config dials ``unix/<base>/sockets/<host>`` for every request to a plain host name that carries
none of our credentials. That name exists only for a public URL of a running VM: a port bridge of its own
(:meth:`~ussycode.proxy.bridge.BridgeManager.open_at`) into the VM's port. For any other host the dial fails
with "no such file" before anything is sent, and the request goes through forward-auth, which names the
upstream itself. Making a VM public or private, renaming, starting or stopping it opens or closes a listener
here: Caddy's config never changes, and in-flight requests, downloads and WebSockets of other hosts are never
touched.

A listener opens when a public host is first asked for (forward-auth served it through the fallback:
:meth:`PublicHosts.request`), not when the host becomes public, so sharing changes that nobody visits in
between start no process; from then on the host is served on the fast path.

Each host's listener is its own because Caddy keeps idle connections per dial address, that is per host name:
when a host stops being public (or its name moves to another VM), its socket is removed first (new requests
fall back to forward-auth) and then its bridge is closed, which ends the connections Caddy kept for that name,
so no kept connection can carry a later request to the VM that had the name.

A Caddy this server starts runs in ``<base>`` and dials the relative ``unix/sockets/<host>``, so a long data
dir does not matter; an attached Caddy dials the absolute path, and a host whose path would not fit in a unix
socket address (107 bytes) is left out there (it is still served, through forward-auth).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path

from ussycode.errors import UssyError
from ussycode.proxy.bridge import MAX_UNIX_PATH, Bridge, BridgeManager
from ussycode.proxy.links import FrontLinks, RoutedHost
from ussycode.proxy.routes import valid_host

log = logging.getLogger(__name__)



class PublicHosts:
    """``<base>/sockets/<host>``: a listener per public host of a running VM, each into (VM id, port)."""

    def __init__(self, base: Path, *, relative: bool = False, links: FrontLinks | None = None) -> None:
        """``relative``: Caddy runs with ``base`` as its working directory (a Caddy this server starts).
        ``links``: public hosts are routed addresses (:mod:`ussycode.proxy.links`) instead of sockets."""
        self.base = Path(base)
        self.sockets = self.base / "sockets"
        self.relative = relative
        self.links = links
        self._open: dict[str, tuple[tuple[str, int], Bridge | RoutedHost]] = {}
        self._requested: set[str] = set()

    @property
    def _dial_dir(self) -> Path:
        return Path(self.sockets.name) if self.relative else self.sockets

    def dial_template(self, placeholder: str = "{http.request.host}") -> str:
        return f"unix/{self._dial_dir}/{placeholder}"

    def fits(self, host: str) -> bool:
        return self.links is not None or len(str(self._dial_dir / host)) <= MAX_UNIX_PATH

    def current(self) -> dict[str, tuple[str, int]]:
        """host -> (VM id, port) for every host served on the fast path now."""
        return {host: key for host, (key, _) in self._open.items()}

    def request(self, host: str) -> bool:
        """Forward-auth served ``host`` as public: it should get a listener (at the next :meth:`sync`, if it is
        still public then). True if that is news (the caller then runs a sync)."""
        if host in self._open or host in self._requested or not (valid_host(host) and self.fits(host)):
            return False
        self._requested.add(host)
        return True

    async def sync(self, wanted: Mapping[str, tuple[str, int]], bridges: BridgeManager) -> None:
        """Make the listeners exactly the ``wanted`` public hosts (host -> (VM id, port)) that were asked for;
        listeners come from ``bridges``."""
        self.sockets.mkdir(parents=True, exist_ok=True)
        want = {h: key for h, key in wanted.items() if valid_host(h) and self.fits(h)}
        for host in sorted(set(wanted) - set(want)):
            log.debug("public host %s served through forward-auth (name too long for the fast path)", host)
        self._requested &= set(want)  # a host that stops being public opens lazily again when it comes back
        for host, (key, bridge) in sorted(self._open.items()):
            if want.get(host) != key or not bridge.alive:
                await self._close(host)
        for entry in self.sockets.iterdir():
            if entry.name not in self._open:  # a previous server's, or left by a crash
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
        for host, key in sorted(want.items()):
            if host in self._requested and host not in self._open:
                try:
                    self._open[host] = (key, await self._start(host, key, bridges))
                except (OSError, UssyError) as exc:  # served through forward-auth meanwhile
                    log.warning("public host %s: no listener (%s); forward-auth serves it", host, exc)
        if self.links is not None:
            await self.links.publish()

    async def _start(self, host: str, key: tuple[str, int], bridges: BridgeManager) -> Bridge | RoutedHost:
        if self.links is None:
            return await bridges.open_at(*key, self.sockets / host)
        netns = await bridges.netns_for(*key, forwarder=False)
        if netns is None:
            raise UssyError(f"the runtime of VM {key[0]} offers no namespace to route into")
        return await self.links.open(host, netns, key[1])

    async def _close(self, host: str) -> None:
        _, bridge = self._open.pop(host)
        with contextlib.suppress(FileNotFoundError):
            (self.sockets / host).unlink()  # first: from now on Caddy's dial fails and falls back
        await bridge.close()  # then: the connections Caddy kept for this name end

    async def clear(self) -> None:
        """Close every listener and forget what was asked for."""
        self._requested.clear()
        for host in sorted(self._open):
            await self._close(host)
        if self.links is not None:
            await self.links.publish()
