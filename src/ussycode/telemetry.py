"""Metrics (Prometheus) and traces (OpenTelemetry) for every layer; no secrets in either.

Metrics live in one process-wide registry (:data:`REGISTRY`); counters and histograms cost a microsecond, so they
sit on hot paths. What the database knows (VMs by state and runtime, users by tier) is read when ``/metrics`` is
scraped (:func:`render`), not kept in step by hand. Labels are small fixed sets (an operation's verb, a route
class, an outcome), never a user, a VM name or a path.

Traces: off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the traces-specific variable) is set, then spans for lobby
and API commands, VM lifecycle operations, HTTP requests of the app server and mail deliveries go to that OTLP/HTTP
collector in batches. :func:`span` is a no-op context manager otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import secrets
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
_OP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
_FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

VM_OPERATIONS = Histogram("ussycode_vm_operation_seconds", "VM lifecycle operations (create, start, stop, rm, ...)",
                          ["op", "outcome"], buckets=_OP_BUCKETS, registry=REGISTRY)
COMMANDS = Histogram("ussycode_command_seconds", "Lobby and /exec commands", ["command", "source", "outcome"],
                     buckets=_FAST_BUCKETS, registry=REGISTRY)


@functools.lru_cache(maxsize=1024)
def command_seconds(command: str, source: str, outcome: str) -> Histogram:
    """:data:`COMMANDS` for these labels, looked up once (every command passes here; the labels are few)."""
    return COMMANDS.labels(command, source, outcome)


SSH_SESSIONS = Gauge("ussycode_ssh_sessions", "Open SSH sessions", ["kind"], registry=REGISTRY)
HTTP_REQUESTS = Counter("ussycode_http_requests_total", "Requests to the app server", ["route", "status"],
                        registry=REGISTRY)
HTTP_SECONDS = Histogram("ussycode_http_request_seconds", "App server request durations", ["route"],
                         buckets=_FAST_BUCKETS, registry=REGISTRY)
FORWARD_AUTH = Counter("ussycode_forward_auth_decisions_total", "Access decisions for VM URLs", ["outcome"],
                       registry=REGISTRY)
RATE_LIMITED = Counter("ussycode_rate_limited_total", "Requests refused by a rate limit", ["limiter"],
                       registry=REGISTRY)
MAIL = Counter("ussycode_mail_total", "Mail by direction and outcome", ["direction", "outcome"], registry=REGISTRY)
LLM_TOKENS = Counter("ussycode_llm_tokens_total", "Tokens the LLM upstreams reported", ["provider", "kind"],
                     registry=REGISTRY)
LLM_REQUESTS = Counter("ussycode_llm_requests_total", "LLM gateway requests by outcome", ["provider", "outcome"],
                       registry=REGISTRY)
RUNTIME_ERRORS = Counter("ussycode_runtime_errors_total", "VMs that failed in their runtime", ["runtime"],
                         registry=REGISTRY)

# The request (HTTP) or command (lobby) being handled: logs carry it (see ussycode.log).
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("ussycode_request_id", default="")


def new_request_id() -> str:
    return secrets.token_hex(8)


def route_class(path: str) -> str:
    """A request path -> a small fixed label (never the path itself)."""
    for prefix, name in (("/exec", "exec"), ("/health", "health"), ("/admin", "admin"),
                         ("/__ussycode/forward-auth", "forward_auth"),
                         ("/__ussycode/", "sign_in"), ("/openapi", "api_docs"), ("/docs", "api_docs")):
        if path.startswith(prefix):
            return name
    return "other" if path != "/" else "home"


class _Snapshot(Collector):
    """What the database said at scrape time, as gauges."""

    def __init__(self, stats: Mapping[str, Any]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        vms = GaugeMetricFamily("ussycode_vms", "VMs by state and runtime", labels=["state", "runtime"])
        for state, runtime, n in self.stats.get("vms_by_state", []):
            vms.add_metric([state, runtime], n)
        yield vms
        users = GaugeMetricFamily("ussycode_users", "Accounts by trust tier", labels=["tier"])
        for tier, n in sorted(self.stats.get("users_by_tier", {}).items()):
            users.add_metric([tier], n)
        yield users
        yield GaugeMetricFamily("ussycode_users_suspended", "Suspended accounts", value=self.stats.get("suspended", 0))


def render(stats: Mapping[str, Any]) -> bytes:
    """The Prometheus text exposition: the process's metrics and the database snapshot ``stats``."""
    snapshot = CollectorRegistry(auto_describe=False)
    snapshot.register(_Snapshot(stats))
    return generate_latest(REGISTRY) + generate_latest(snapshot)


# --- traces ----------------------------------------------------------------------------------------------------------

_tracer: trace.Tracer = trace.NoOpTracer()
_provider: TracerProvider | None = None


def tracing_enabled(env: Mapping[str, str] = os.environ) -> bool:
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup_tracing(exporter: SpanExporter | None = None, *, service: str = "ussycode") -> bool:
    """Send spans to ``exporter`` (default: OTLP/HTTP as the standard ``OTEL_*`` variables say, when set).

    Returns whether tracing is on. Our own provider: the process-global one is left alone (tests may set up
    several)."""
    global _tracer, _provider
    if exporter is None:
        if not tracing_enabled():
            return False
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    old, _provider = _provider, provider
    _tracer = provider.get_tracer("ussycode")
    if old is not None:
        old.shutdown()
    log.info("tracing on: spans go to the OTLP collector")
    return True


def flush_tracing(timeout_ms: int = 5000) -> None:
    if _provider is not None:
        _provider.force_flush(timeout_ms)


def shutdown_tracing() -> None:
    global _tracer, _provider
    provider, _provider = _provider, None
    _tracer = trace.NoOpTracer()
    if provider is not None:
        provider.shutdown()


_NO_SPAN: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()


def span(name: str, **attributes: str | int | bool) -> contextlib.AbstractContextManager[Any]:
    """A span around a block; an exception marks it failed and propagates. With tracing off, nothing at all (not
    even a no-op span: every request and command passes here)."""
    if _provider is None:
        return _NO_SPAN
    return _tracer.start_as_current_span(name, attributes=attributes)
