"""``POST /exec``: run one lobby command with a Bearer token, through the same registry and rate limiter as SSH.

Request: ``Authorization: Bearer <usy1.… | usy0.…>``; the body is the command line exactly as typed over SSH
(``text/plain``, or no content type) or ``{"command": "..."}`` (``application/json``); UTF-8, at most 64 KiB.

Reply (HTTP 200) when the command ran, whatever its exit status: ``{"output": <stdout>, "exit_code": 0|1|2}`` plus
``"error": <stderr>`` when the command wrote an error (``error: …`` and, for usage errors, the usage line) — the
same text and statuses as ``ssh host <command>``. ``--json`` commands put their JSON document in ``output``.

Every other outcome is ``{"error": "...", "code": N}`` with status N: 400 unusable body (not UTF-8, NUL byte,
empty, bad JSON or wrong JSON types, unbalanced quotes), 401 missing/bad/revoked/expired token (audited), 403
command not permitted by the token, 405 not POST, 413 body over 64 KiB, 415 other content type, 429 rate limited
(``Retry-After``), 504 the command ran over 30 s (it is cancelled), 503 tokens not available.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from ussycode.api.context import client_address_from
from ussycode.commands.context import CommandContext, Output
from ussycode.commands.registry import dispatch, render_error, split_async
from ussycode.errors import CommandNotPermitted, Forbidden, RateLimited, Unauthenticated, UsageError
from ussycode.proxy.hygiene import CLIENT_ADDR_HEADER, PROXY_KEY_HEADER
from ussycode.services.container import Services

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
EXEC_TIMEOUT = 30.0
_TEXT_CHARSETS = frozenset({"", "utf-8", "utf8", "us-ascii"})


class _Reject(Exception):
    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status_code=code, headers=headers)


_AUTHORIZATION, _CONTENT_TYPE, _CONTENT_LENGTH = b"authorization", b"content-type", b"content-length"
_PROXY_KEY, _CLIENT_ADDR = PROXY_KEY_HEADER.lower().encode(), CLIENT_ADDR_HEADER.lower().encode()
_READ = frozenset({_AUTHORIZATION, _CONTENT_TYPE, _CONTENT_LENGTH, _PROXY_KEY, _CLIENT_ADDR})


def read_headers(scope: Scope) -> dict[bytes, str]:
    """The headers /exec reads, each at its first occurrence (as Starlette's ``Headers.get``), in one pass."""
    found: dict[bytes, str] = {}
    for name, value in scope["headers"]:
        if name in _READ and name not in found:
            found[name] = value.decode("latin-1")
    return found


def bearer_of(headers: dict[bytes, str]) -> str:
    """The Bearer credential, or "" when there is none (the token service refuses and audits that)."""
    scheme, _, value = headers.get(_AUTHORIZATION, "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _media_type(raw: str) -> tuple[str, dict[str, str]]:
    parts = [p.strip() for p in raw.split(";")]
    params: dict[str, str] = {}
    for p in parts[1:]:
        k, _, v = p.partition("=")
        params[k.strip().lower()] = v.strip().strip('"').lower()
    return parts[0].lower(), params


def _content_kind(content_type: str) -> str:
    media, params = _media_type(content_type)
    # `curl -d 'ls --json'` labels its body application/x-www-form-urlencoded but sends it as typed: it is taken
    # as the command line, verbatim (no form decoding, which would turn '+' into a space). /exec never reads
    # cookies, so a cross-site form cannot carry a credential here.
    if media in ("", "text/plain", "application/x-www-form-urlencoded"):
        if params.get("charset", "") not in _TEXT_CHARSETS:
            raise _Reject(415, "the body must be UTF-8 (Content-Type: text/plain; charset=utf-8)")
        return "text"
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return "json"
    raise _Reject(415, f"unsupported content type {media[:60]!r}: send the command line as text/plain, or "
                       "{\"command\": \"...\"} as application/json (curl: -H 'Content-Type: text/plain')")


async def read_body(receive: Receive) -> bytes:
    """The body, refusing more than :data:`MAX_BODY` bytes by counting what actually arrives (the declared
    length is checked before it is read)."""
    chunks: list[bytes] = []
    size = 0
    while True:  # the ASGI messages themselves (Starlette's stream() costs more than a small command line)
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise _Reject(413, f"body too large: at most {MAX_BODY} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def command_line(kind: str, body: bytes) -> str:
    """The command line from the body; _Reject(400) when it cannot be one."""
    if kind == "json":
        try:
            doc: Any = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            raise _Reject(400, "the body is not valid JSON; expected {\"command\": \"...\"}") from None
        if not isinstance(doc, dict) or set(doc) != {"command"} or not isinstance(doc["command"], str):
            raise _Reject(400, "expected a JSON object with exactly one key, \"command\", a string")
        line: str = doc["command"]
    else:
        try:
            line = body.decode("utf-8")
        except UnicodeDecodeError:
            raise _Reject(400, "the body is not valid UTF-8") from None
    if "\x00" in line:
        raise _Reject(400, "the command line contains a NUL byte")
    if not line.strip():
        raise _Reject(400, "empty command: send a command line such as 'whoami' or 'ls --json'")
    return line


class ExecEndpoint:
    """The ASGI endpoint (a class, so every method reaches it and gets a JSON 405)."""

    def __init__(self, timeout: float = EXEC_TIMEOUT) -> None:
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self.handle(scope, receive)
        except _Reject as rej:
            response = error_response(rej.code, rej.message, rej.headers)
        except ClientDisconnect:
            return  # the client went away while sending the body: nobody to answer
        await response(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive) -> Response:
        # Read from the ASGI scope in one pass rather than through a Request: every step here is paid per command.
        if scope["method"] != "POST":
            raise _Reject(405, "use POST /exec", {"Allow": "POST"})
        services: Services = scope["app"].state.services
        if services.tokens is None:
            raise _Reject(503, "API tokens are not available on this server")
        headers = read_headers(scope)
        length = headers.get(_CONTENT_LENGTH)
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            raise _Reject(413, f"body too large: at most {MAX_BODY} bytes")
        peer = scope.get("client")
        client = client_address_from(services, peer[0] if peer else "", headers.get(_PROXY_KEY, ""),
                                     headers.get(_CLIENT_ADDR, ""))
        try:
            actor = await services.tokens.authenticate(bearer_of(headers), source="api", client=client)
        except Unauthenticated as exc:
            raise _Reject(401, exc.user_message, {"WWW-Authenticate": 'Bearer realm="ussycode"'}) from None
        except RateLimited as exc:  # too many refused tokens from this address
            raise _Reject(429, exc.user_message, {"Retry-After": str(math.ceil(exc.retry_after))}) from None
        except Forbidden as exc:  # a suspended account
            raise _Reject(403, exc.user_message) from None
        kind = _content_kind(headers.get(_CONTENT_TYPE, ""))
        if length is not None and not length.isdigit():  # a digit string over the limit was refused above
            raise _Reject(400, "invalid Content-Length")
        line = command_line(kind, await read_body(receive))
        try:
            argv = await split_async(line)
        except UsageError as exc:
            raise _Reject(400, exc.user_message) from None
        if not argv:
            raise _Reject(400, "empty command: send a command line such as 'whoami' or 'ls --json'")
        out = Output()
        ctx = CommandContext(actor=actor, services=services, out=out, interactive=False)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                status = await dispatch(ctx, argv)
        except CommandNotPermitted as exc:
            await services.tokens.record_forbidden(actor, exc.command)
            raise _Reject(403, exc.user_message) from None
        except RateLimited as exc:
            return error_response(429, exc.user_message, {"Retry-After": str(math.ceil(exc.retry_after))})
        except TimeoutError:
            log.info("API command %s by %s cancelled after %.0fs", argv[0][:40], actor.handle, self.timeout)
            return error_response(504, f"the command ran over {self.timeout:g} s and was cancelled")
        except Exception as exc:  # every failure of the command itself is rendered like SSH renders it
            text, status = render_error(exc)
            out.error(text)
        log.debug("API %s by %s: %d in %.3fs", argv[0][:40], actor.handle, status, time.monotonic() - started)
        body: dict[str, Any] = {"output": out.stdout, "exit_code": status}
        if out.stderr:
            body["error"] = out.stderr
        return JSONResponse(body)


def exec_routes(timeout: float = EXEC_TIMEOUT) -> list[BaseRoute]:
    return [Route("/exec", ExecEndpoint(timeout), name="exec")]
