"""The front door's own answers for a VM that cannot serve right now (pure; HTML for browsers, JSON otherwise).

Which page a visitor gets (each only after the access decision allowed the request, so a private VM's state is
never shown to a stranger):

- stopped VM -> 503 ``vm_stopped`` ("start it with ``start <vm>``");
- VM being created or started -> 503 ``vm_starting`` with ``Retry-After``;
- VM in an error state (it failed to start, or its runtime lost it) -> 503 ``vm_failed``;
- running VM with nothing on the port -> 502 ``no_listener`` (Caddy's error routes, ``proxy/front.py``);
- unknown VM or host -> 404 ``unknown_vm`` (``decide``);
- a VM whose owner is suspended -> 403 ``suspended``, to every visitor, before any access decision.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from html import escape

from ussycode.types import VmStatus


@dataclass(frozen=True)
class Page:
    status: int
    reason: str
    body: str
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


def wants_html(accept: str, method: str) -> bool:
    return method in ("GET", "HEAD") and "text/html" in accept.lower()


def error_json(status: int, reason: str, message: str, **extra: str) -> str:
    """The JSON body of every error the front door answers an API client: ``{"error", "code", "reason"}``
    (and ``extra``, such as the sign-in URL)."""
    return json.dumps({"error": message, "code": status, "reason": reason, **extra})


def _render(html: bool, status: int, reason: str, title: str, message_html: str, message_text: str,
            headers: tuple[tuple[str, str], ...] = ()) -> Page:
    if html:
        body = (f"<!doctype html><html><head><meta charset=utf-8><title>{escape(title)}</title></head>"
                f"<body><h1>{escape(title)}</h1><p>{message_html}</p></body></html>\n")
        return Page(status, reason, body, "text/html; charset=utf-8", headers)
    return Page(status, reason, error_json(status, reason, message_text), "application/json", headers)


def vm_state_page(vm_name: str, status: VmStatus, *, accept: str = "", method: str = "GET") -> Page | None:
    """The page for a VM that is not running (None when it runs)."""
    html = wants_html(accept, method)
    name = escape(vm_name)
    if status is VmStatus.RUNNING:
        return None
    if status is VmStatus.STOPPED:
        return _render(html, 503, "vm_stopped", f"{vm_name} is stopped",
                       f"The VM <b>{name}</b> is stopped. Its owner can start it with <code>start {name}</code> in "
                       "the ussycode lobby.",
                       f"VM {vm_name} is stopped; its owner can start it with 'start {vm_name}'")
    if status is VmStatus.CREATING:
        return _render(html, 503, "vm_starting", f"{vm_name} is starting",
                       f"The VM <b>{name}</b> is being created or started. This page works again in a few "
                       "seconds.", f"VM {vm_name} is starting; retry in a few seconds", (("Retry-After", "5"),))
    return _render(html, 503, "vm_failed", f"{vm_name} is not available",
                   f"The VM <b>{name}</b> failed (it could not start, or stopped unexpectedly). Its owner can "
                   f"see it with <code>ls</code> and retry with <code>restart {name}</code>.",
                   f"VM {vm_name} is in an error state; its owner can retry with 'restart {vm_name}'")


def suspended_page(vm_name: str, *, accept: str = "", method: str = "GET") -> Page:
    """The owner's account is suspended: its VMs, shares and links answer this until it is unsuspended."""
    return _render(wants_html(accept, method), 403, "suspended", f"{vm_name} is suspended",
                   f"The account that owns <b>{escape(vm_name)}</b> is suspended by the operators of this server.",
                   f"VM {vm_name} belongs to a suspended account")


def forwarder_failed_page(vm_name: str, *, accept: str = "", method: str = "GET") -> Page:
    return _render(wants_html(accept, method), 502, "forwarder_failed", f"{vm_name} is not reachable",
                   f"The VM <b>{escape(vm_name)}</b> could not be reached. Retry in a moment.",
                   f"VM {vm_name} could not be reached; retry in a moment")
