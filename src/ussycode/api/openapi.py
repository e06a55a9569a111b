"""``GET /openapi.json``: the hand-written OpenAPI 3.0 description of the public API (a schemathesis test holds
the server to it)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from ussycode import __version__
from ussycode.api.exec import MAX_BODY

_ERROR = {"$ref": "#/components/schemas/Error"}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    resp: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": _ERROR}}}
    if headers:
        resp["headers"] = headers
    return resp


def openapi_document(server_url: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {
            "title": "ussycode API",
            "version": __version__,
            "description": (
                "Run lobby commands over HTTPS. The body of POST /exec is the command line exactly as typed over "
                "`ssh -p 2222 host`; the reply carries its stdout, stderr and exit status (0 ok, 1 failed, 2 "
                "usage). Tokens: `token create` over SSH (usy1.…) or a usy0.… token signed with "
                "`ssh-keygen -Y sign -n ussycode-api`."
            ),
        },
        "paths": {
            "/exec": {
                "post": {
                    "operationId": "exec",
                    "summary": "Run one command",
                    "security": [{"bearer": []}],
                    "requestBody": {
                        "required": True,
                        "description": f"The command line (UTF-8, at most {MAX_BODY} bytes). A body labelled "
                                       "application/x-www-form-urlencoded (what `curl -d` sends) is read as "
                                       "text/plain.",
                        "content": {
                            "text/plain": {"schema": {"$ref": "#/components/schemas/CommandLine"}},
                            "application/json": {"schema": {
                                "type": "object", "required": ["command"], "additionalProperties": False,
                                "properties": {"command": {"$ref": "#/components/schemas/CommandLine"}},
                            }},
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "The command ran (whatever its exit status).",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ExecResult"}}},
                        },
                        "400": _error("The body is not a usable command line (not UTF-8, NUL byte, empty, "
                                      "wrong JSON, unbalanced quotes)."),
                        "401": _error("Missing, malformed, unknown, revoked or expired token.",
                                      {"WWW-Authenticate": {"schema": {"type": "string"}}}),
                        "403": _error("The token does not permit this command."),
                        "413": _error(f"The body is larger than {MAX_BODY} bytes."),
                        "415": _error("Unsupported content type (use text/plain or application/json)."),
                        "429": _error("Rate limited (per user, shared with SSH one-shot commands).",
                                      {"Retry-After": {"description": "Seconds to wait.",
                                                       "schema": {"type": "integer", "minimum": 1}}}),
                        "503": _error("API tokens are not available on this server."),
                        "504": _error("The command ran over 30 s and was cancelled."),
                    },
                },
            },
            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "Liveness (no authentication)",
                    "security": [],
                    "responses": {"200": {"description": "The server is up.", "content": {"application/json": {
                        "schema": {
                            "type": "object", "required": ["status", "version", "time"],
                            "properties": {"status": {"type": "string", "enum": ["ok"]},
                                           "version": {"type": "string"},
                                           "time": {"type": "string", "format": "date-time"}},
                        }}}}},
                },
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.0 document.",
                                          "content": {"application/json": {"schema": {"type": "object"}}}}},
                },
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "usy1.<id>.<secret> or usy0.<perms>.<sshsig>"}},
            "schemas": {
                "CommandLine": {"type": "string", "minLength": 1, "maxLength": MAX_BODY // 4,
                                "pattern": "^[^\\u0000]*\\S[^\\u0000]*$",
                                "example": "ls --json"},
                "ExecResult": {
                    "type": "object", "required": ["output", "exit_code"], "additionalProperties": False,
                    "properties": {
                        "output": {"type": "string", "description": "stdout (JSON text for --json commands)"},
                        "exit_code": {"type": "integer", "enum": [0, 1, 2]},
                        "error": {"type": "string", "description": "stderr: present when the command failed"},
                    },
                },
                "Error": {
                    "type": "object", "required": ["error", "code"], "additionalProperties": False,
                    "properties": {"error": {"type": "string"}, "code": {"type": "integer"}},
                },
            },
        },
    }
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc


async def openapi_json(request: Request) -> JSONResponse:
    settings = request.app.state.services.settings
    return JSONResponse(openapi_document(settings.public_url(settings.domain)))


def openapi_routes() -> list[BaseRoute]:
    return [Route("/openapi.json", openapi_json, methods=["GET"])]
