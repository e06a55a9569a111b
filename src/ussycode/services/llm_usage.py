"""Token usage as the upstream reports it, read from a response while it streams through (pure, incremental).

Formats: OpenAI (chat completions: ``usage.prompt_tokens``/``completion_tokens``, the last chunk of a stream when
``stream_options.include_usage`` is on; responses API: ``response.usage.input_tokens``/``output_tokens``) and
Anthropic (``usage.input_tokens``/``output_tokens`` plus cache tokens; a stream reports input in
``message_start`` and a running output count in ``message_delta``). Every ``usage`` object seen is read and the
largest count of each kind kept, which is right for all of them (counts in a stream only grow).

Nothing is estimated: a response that reports no usage counts zero tokens (and one request).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_JSON_BODY = 8 * 1024 * 1024  # a non-streamed answer larger than this is passed on but not parsed
MAX_LINE = 1024 * 1024


@dataclass
class Tokens:
    input: int = 0
    output: int = 0

    @property
    def total(self) -> int:
        return self.input + self.output


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_of(doc: Any) -> Tokens | None:
    """The usage an event or a whole answer carries (at the top, or under ``message``/``response``)."""
    if not isinstance(doc, dict):
        return None
    for holder in (doc, doc.get("message"), doc.get("response")):
        if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
            u = holder["usage"]
            inp = _int(u.get("prompt_tokens")) or _int(u.get("input_tokens"))
            inp += _int(u.get("cache_creation_input_tokens")) + _int(u.get("cache_read_input_tokens"))
            out = _int(u.get("completion_tokens")) or _int(u.get("output_tokens"))
            return Tokens(inp, out)
    return None


class UsageMeter:
    """Feed the response body as it passes (``feed``), then read :attr:`tokens` (``finish`` first)."""

    def __init__(self, content_type: str) -> None:
        self.streaming = "text/event-stream" in content_type.lower()
        self.tokens = Tokens()
        self._buf = bytearray()
        self._overflow = False

    def _see(self, doc: Any) -> None:
        found = usage_of(doc)
        if found is not None:
            self.tokens.input = max(self.tokens.input, found.input)
            self.tokens.output = max(self.tokens.output, found.output)

    def feed(self, chunk: bytes) -> None:
        if self._overflow:
            return
        self._buf += chunk
        if not self.streaming:
            if len(self._buf) > MAX_JSON_BODY:
                self._overflow = True
                self._buf.clear()
            return
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_LINE:  # a line this long is not an event we can read; skip it
                    self._buf.clear()
                return
            line = bytes(self._buf[:end]).strip()
            del self._buf[:end + 1]
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                if payload and payload != b"[DONE]":
                    try:
                        self._see(json.loads(payload))
                    except ValueError:
                        pass

    def finish(self) -> Tokens:
        if self.streaming:
            self.feed(b"\n")
        elif not self._overflow and self._buf:
            try:
                self._see(json.loads(bytes(self._buf)))
            except ValueError:
                pass
        self._buf.clear()
        return self.tokens


def with_stream_usage(body: bytes, api_format: str, path: str) -> bytes:
    """For an OpenAI-format streamed chat completion, ask the upstream to report usage in its last chunk
    (``stream_options.include_usage``); anything else is returned unchanged."""
    if api_format != "openai" or not path.rstrip("/").endswith("completions") or b'"stream"' not in body:
        return body
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    if not isinstance(doc, dict) or doc.get("stream") is not True:
        return body
    options = doc.get("stream_options")
    if options is None:
        doc["stream_options"] = {"include_usage": True}
    elif isinstance(options, dict):
        options["include_usage"] = True
    else:
        return body
    return json.dumps(doc).encode()
