"""``ANY /gateway/llm/<provider>/<upstream path>`` on the metadata address: the provider's own API, with the
owner's key (or the operator's) added here, so no key ever enters the VM.

The VM is known from the listener that took the connection (never from the request). What reaches the upstream is
an allowlist: the method, the path below the provider, the query, the body (capped), ``Content-Type``/``Accept``
and the provider's own version headers, plus the credential :meth:`LlmService.authorize` chose; the client's
``Authorization``/``x-api-key``, cookies and every ``X-Forwarded-*`` are dropped. The answer streams back chunk by
chunk as it arrives (SSE unbuffered), with its status and content headers, while a :class:`UsageMeter` reads the
token counts it reports; they are recorded when it ends. Upstream unreachable or answering garbage -> 502, too slow
-> 504, as JSON ``{"error","code"}``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ussycode import telemetry
from ussycode.errors import RateLimited, UssyError
from ussycode.services.container import Services
from ussycode.services.llm import Grant
from ussycode.services.llm_usage import UsageMeter, with_stream_usage

log = logging.getLogger(__name__)
MAX_BODY = 8 * 1024 * 1024
KEEP_OPEN = "ussycode.keep_open"  # scope key: extends the connection's deadline (metadata/server.py)
STREAM_SECONDS = 1800.0  # the longest an answer may stream
REQUEST_HEADERS = ("content-type", "accept", "user-agent", "anthropic-version", "anthropic-beta", "openai-beta")
RESPONSE_HEADERS = ("content-type", "cache-control", "request-id", "x-request-id", "retry-after")
RESPONSE_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-", "openai-")
TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=30.0, pool=10.0)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "code": status}, status_code=status,
                        headers={"Connection": "close", **(headers or {})})


class _Relay(StreamingResponse):
    """Sends the upstream's answer as it comes, then records the usage; the upstream stream is closed on every
    path (the VM hung up, the stream broke)."""

    def __init__(self, upstream: httpx.Response, on_done: Callable[[UsageMeter], Any], headers: dict[str, str]):
        self.upstream = upstream
        self.meter = UsageMeter(upstream.headers.get("content-type", ""))
        self.on_done = on_done
        super().__init__(self._chunks(), status_code=upstream.status_code, headers=headers)

    async def _chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self.upstream.aiter_raw():
            self.meter.feed(chunk)
            yield chunk

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.meter.finish()
            self.on_done(self.meter)  # counted now, written in the background: the VM is not kept waiting
            await self.upstream.aclose()


def gateway(services: Services, vm_id_key: str) -> Callable[[Request], Any]:
    client: dict[str, httpx.AsyncClient] = {}

    def http() -> httpx.AsyncClient:
        if "c" not in client:
            client["c"] = httpx.AsyncClient(timeout=TIMEOUT, follow_redirects=False, trust_env=False,
                                            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100))
        return client["c"]

    async def endpoint(request: Request) -> Response:
        llm = services.llm
        if llm is None:
            return _error(503, "the LLM gateway is not available on this server")
        provider = request.path_params["provider"]
        path = request.path_params["path"]
        try:
            grant = await llm.authorize(request.scope[vm_id_key], provider)
        except RateLimited as exc:
            telemetry.LLM_REQUESTS.labels("?", "refused").inc()
            return _error(429, exc.user_message, {"Retry-After": str(int(exc.retry_after) + 1)})
        except UssyError as exc:
            telemetry.LLM_REQUESTS.labels("?", "refused").inc()
            return _error(exc.http_status, exc.user_message)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return _error(413, f"request body over {MAX_BODY // 2**20} MiB")
        body = with_stream_usage(body, grant.upstream.api_format, path)
        headers = {k: v for k in REQUEST_HEADERS if (v := request.headers.get(k)) is not None}
        headers.update(grant.auth_headers)
        headers["accept-encoding"] = "identity"  # usage is read from the bytes as they pass
        url = f"{grant.upstream.base_url}/{path}"
        keep_open = request.scope.get(KEEP_OPEN)
        if keep_open is not None:
            keep_open(STREAM_SECONDS)
        try:
            upstream_request = http().build_request(request.method, url, params=request.url.query or None,
                                                    content=body, headers=headers)
            upstream = await http().send(upstream_request, stream=True)
        except httpx.TimeoutException:
            telemetry.LLM_REQUESTS.labels(provider, "timeout").inc()
            return _error(504, f"{provider} did not answer in time")
        except httpx.HTTPError as exc:
            telemetry.LLM_REQUESTS.labels(provider, "unreachable").inc()
            log.warning("LLM upstream %s failed: %s", provider, type(exc).__name__)
            return _error(502, f"{provider} could not be reached or answered garbage")
        out = {k: v for k, v in upstream.headers.items()
               if k.lower() in RESPONSE_HEADERS or k.lower().startswith(RESPONSE_PREFIXES)}
        out["Connection"] = "close"

        def done(meter: UsageMeter, grant: Grant = grant) -> None:
            telemetry.LLM_REQUESTS.labels(provider, str(upstream.status_code)).inc()
            if services.llm is not None:
                services.llm.record_later(grant, meter.tokens)

        return _Relay(upstream, done, out)

    return endpoint
