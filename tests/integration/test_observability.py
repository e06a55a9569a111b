"""Observability of a running server: Prometheus ``/metrics`` on --admin-addr after real traffic (parsed with
prometheus_client's parser), OTLP traces received by a local collector stand-in, JSON log lines with request ids,
and no secret (API token, sign-in link, share link) in any log line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ussycode import log as ulog
from ussycode import telemetry
from ussycode.runtime.fake import FakeRuntime
from ussycode.tasks import TaskGroup

pytestmark = pytest.mark.asyncio


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_after_real_traffic(server_factory, test_image: object) -> None:
    server = await server_factory(runtime=FakeRuntime())
    app = server.app
    assert app.ops_port is not None
    ops = f"http://127.0.0.1:{app.ops_port}"
    async with httpx.AsyncClient(timeout=20) as c:
        before = samples((await c.get(f"{ops}/metrics")).text)
        key = await server.register("root1")
        for name in ("mone", "mtwo"):
            assert (await server.ssh(key, "new", f"--name={name}")).exit_status == 0
        assert (await server.ssh(key, "stop", "mtwo")).exit_status == 0
        for _ in range(25):  # refused tokens: 401s, then the per-address limit answers 429
            await c.post(f"http://127.0.0.1:{app.http_port}/exec", content="whoami",
                         headers={"Authorization": "Bearer usy1.nope.nope"})
        r = await c.get(f"{ops}/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        after = samples(r.text)
    assert value(after, "ussycode_vms", state="running", runtime="fake") == 1
    assert value(after, "ussycode_vms", state="stopped", runtime="fake") == 1
    assert value(after, "ussycode_users", tier="admin") == 1
    grew = {k: after[k] - before.get(k, 0.0) for k in after}
    assert value(grew, "ussycode_vm_operation_seconds_count", op="create", outcome="ok") == 2
    assert value(grew, "ussycode_vm_operation_seconds_count", op="stop", outcome="ok") == 1
    assert value(grew, "ussycode_command_seconds_count", command="new", source="ssh", outcome="ok") == 2
    assert value(grew, "ussycode_http_requests_total", route="exec", status="401") >= 1
    assert value(grew, "ussycode_http_requests_total", route="exec", status="429") >= 1
    assert value(grew, "ussycode_rate_limited_total", limiter="bad_tokens") >= 1
    assert any(name == "ussycode_ssh_sessions" for name, _ in after)
    # nothing user-controlled becomes a label
    assert not any("mone" in str(labels) or "nope" in str(labels) for _, labels in after)


@contextmanager
def captured_logs(fmt: str = "json") -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(ulog.JsonFormatter() if fmt == "json" else ulog.TextFormatter())
    handler.addFilter(ulog.RedactFilter())
    handler.addFilter(ulog.RequestIdFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


async def test_json_logs_carry_request_ids_and_no_secrets(server) -> None:
    with captured_logs() as stream:
        key = await server.register("root1")
        token = json.loads((await server.ssh(key, "token", "create", "--json")).stdout)["token"]
        link = re.search(r"token=(\S+)", (await server.ssh(key, "browser")).stdout)
        assert link is not None
        async with httpx.AsyncClient(timeout=20) as c:
            base = f"http://127.0.0.1:{server.app.http_port}"
            r = await c.post(f"{base}/exec", content="whoami", headers={"Authorization": f"Bearer {token}",
                                                                        "X-Request-Id": "trace-me-42"})
            assert r.status_code == 200 and r.headers.get("x-request-id") == "trace-me-42", r.headers
            forged = token[:-4] + "AAAA"
            await c.post(f"{base}/exec", content="whoami", headers={"Authorization": f"Bearer {forged}"})
            r = await c.get(f"{base}/__ussycode/login?token={link.group(1)}", headers={"Host": "localhost"})
            assert r.status_code == 303, r.text  # signed in
            r = await c.get(f"{base}/health", headers={"X-Request-Id": "bad id <script>"})
            assert re.fullmatch(r"[0-9a-f]{16}", r.headers["x-request-id"])
            logging.getLogger("ussycode.test").info("a client sent %s and %s", token, f"ussy_session={'x' * 20}")
    text = stream.getvalue()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(entry) for entry in lines)
    assert any(entry.get("request_id") for entry in lines)
    for secret in (token, token.split(".")[-1], link.group(1), "x" * 20):
        assert secret not in text, f"a secret reached the log: {secret[:12]}…"
    assert "[redacted]" in text


async def test_traces_reach_an_otlp_collector(server_factory, test_image: object) -> None:
    received: list[bytes] = []

    async def traces(request: Request) -> Response:
        received.append(await request.body())
        return Response(b"", media_type="application/x-protobuf")

    config = uvicorn.Config(Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])]), host="127.0.0.1",
                            port=0, log_level="warning", lifespan="off")
    collector = uvicorn.Server(config)
    tasks = TaskGroup("otlp-collector")
    task = tasks.spawn(collector.serve(), "otlp-collector")
    while not collector.started:
        await asyncio.sleep(0.01)
    port = collector.servers[0].sockets[0].getsockname()[1]
    telemetry.setup_tracing(OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces"))
    try:
        server = await server_factory(runtime=FakeRuntime())
        key = await server.register("root1")
        assert (await server.ssh(key, "new", "--name=traced")).exit_status == 0
        async with httpx.AsyncClient() as c:
            await c.get(f"http://127.0.0.1:{server.app.http_port}/health")
        await asyncio.to_thread(telemetry.flush_tracing)
    finally:
        telemetry.shutdown_tracing()
        collector.should_exit = True
        await task
        await tasks.close()
    names: set[str] = set()
    attributes: dict[str, Any] = {}
    for body in received:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for rs in request.resource_spans:
            service = {a.key: a.value.string_value for a in rs.resource.attributes}.get("service.name")
            assert service == "ussycode"
            for scope in rs.scope_spans:
                for s in scope.spans:
                    names.add(s.name)
                    attributes[s.name] = {a.key: a.value.string_value or a.value.int_value for a in s.attributes}
    assert {"command new", "vm create", "HTTP GET health"} <= names, names
    assert attributes["command new"]["source"] == "ssh"
