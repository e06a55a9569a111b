"""The gateway's pure parts: usage read from every response shape (split at any byte), keys sealed per user and
provider, the stream-usage request rewrite, provider settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from ussycode.config import LlmSettings
from ussycode.services.llm import KeyBox, load_or_create_data_key, validate_key
from ussycode.services.llm_usage import UsageMeter, with_stream_usage

OPENAI_JSON = json.dumps({"choices": [{"message": {"content": "hi"}}],
                          "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}).encode()
OPENAI_SSE = b"".join([
    b'data: {"choices":[{"delta":{"content":"he"}}]}\n\n',
    b'data: {"choices":[{"delta":{"content":"llo"}}]}\n\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":9}}\n\n',
    b"data: [DONE]\n\n",
])
ANTHROPIC_SSE = b"".join([
    b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":25,'
    b'"cache_read_input_tokens":5,"output_tokens":1}}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"Hi"}}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":15}}\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
])
RESPONSES_SSE = (b'event: response.completed\ndata: {"type":"response.completed","response":{"usage":'
                 b'{"input_tokens":3,"output_tokens":4}}}\n\n')


def metered(content_type: str, body: bytes, step: int) -> tuple[int, int]:
    meter = UsageMeter(content_type)
    for i in range(0, len(body), step):
        meter.feed(body[i:i + step])
    tokens = meter.finish()
    return tokens.input, tokens.output


@pytest.mark.parametrize("step", [1, 3, 7, 64, 100_000])
def test_usage_is_read_from_every_shape_split_anywhere(step: int) -> None:
    assert metered("application/json", OPENAI_JSON, step) == (11, 7)
    assert metered("text/event-stream; charset=utf-8", OPENAI_SSE, step) == (12, 9)
    assert metered("text/event-stream", ANTHROPIC_SSE, step) == (30, 15)
    assert metered("text/event-stream", RESPONSES_SSE, step) == (3, 4)
    assert metered("application/json", json.dumps({"usage": {"input_tokens": 4, "output_tokens": 2}}).encode(),
                   step) == (4, 2)


@pytest.mark.parametrize("body", [b"", b"not json", b'{"usage": "lots"}', b'{"usage": {"prompt_tokens": -5}}',
                                  b'{"usage": {"prompt_tokens": true}}', b"data: {broken\n\n", b"\xff" * 100])
def test_garbage_counts_nothing_and_never_raises(body: bytes) -> None:
    for content_type in ("application/json", "text/event-stream"):
        assert metered(content_type, body, 5) == (0, 0)


def test_stream_usage_is_requested_only_for_openai_streams() -> None:
    body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
    asked = json.loads(with_stream_usage(body, "openai", "v1/chat/completions"))
    assert asked["stream_options"] == {"include_usage": True}
    kept = json.loads(with_stream_usage(json.dumps({"stream": True, "stream_options": {"x": 1}}).encode(),
                                        "openai", "v1/chat/completions"))
    assert kept["stream_options"] == {"x": 1, "include_usage": True}
    for unchanged in ((body, "anthropic", "v1/messages"), (b'{"stream": false}', "openai", "v1/chat/completions"),
                      (b"not json", "openai", "v1/chat/completions"), (body, "openai", "v1/embeddings")):
        assert with_stream_usage(*unchanged) == unchanged[0]


def test_keys_are_sealed_per_user_and_provider(tmp_path: Path) -> None:
    path = tmp_path / "llm.key"
    key = load_or_create_data_key(path)
    assert path.stat().st_mode & 0o777 == 0o600 and load_or_create_data_key(path) == key
    box = KeyBox(key)
    sealed = box.seal("u1", "openai", "sk-secret-1234")
    assert b"sk-secret" not in sealed
    assert box.open("u1", "openai", sealed) == "sk-secret-1234"
    assert box.open("u2", "openai", sealed) is None  # copied to another user: does not open
    assert box.open("u1", "anthropic", sealed) is None
    assert box.open("u1", "openai", sealed[:-1] + bytes([sealed[-1] ^ 1])) is None
    assert KeyBox(load_or_create_data_key(tmp_path / "other.key")).open("u1", "openai", sealed) is None
    (tmp_path / "short.key").write_bytes(b"x" * 10)
    with pytest.raises(ValueError):
        load_or_create_data_key(tmp_path / "short.key")


@pytest.mark.parametrize("bad", ["", "   ", "sk with space", "sk-\x1b[31m", "k" * 5000, "sk-é"])
def test_implausible_keys_are_refused(bad: str) -> None:
    from ussycode.errors import UsageError

    with pytest.raises(UsageError):
        validate_key(bad)


def test_provider_settings() -> None:
    llm = LlmSettings.model_validate({"providers": {"openai": {"base_url": "http://127.0.0.1:9/"},
                                                    "local": {"base_url": "http://10.0.0.1:8000/v1",
                                                              "needs_key": False}},
                                      "budgets": {"newbie": 10}})
    openai = llm.provider("openai")
    assert openai is not None and openai.base_url == "http://127.0.0.1:9" and openai.api_format == "openai"
    assert llm.provider("anthropic") is not None and llm.provider("nope") is None
    assert llm.budget("newbie") == 10 and llm.budget("admin") is None
    for bad in ({"providers": {"Bad Name": {"base_url": "http://x"}}},
                {"providers": {"x": {"base_url": "file:///etc/passwd"}}},
                {"providers": {"x": {"base_url": "http://x", "api_format": "soap"}}},
                {"providers": {"x": {"base_url": "http://x", "surprise": 1}}}):
        with pytest.raises(ValidationError):
            LlmSettings.model_validate(bad)


async def test_usage_is_written_in_batches_and_loses_nothing(tmp_path: Path) -> None:
    """Many answers ending together make one write; `llm usage` and a stop write what is counted at once; a failed
    write keeps the counts for the next one."""
    import asyncio
    from unittest import mock

    from ussycode.auth.identity import Actor
    from ussycode.config import load_settings
    from ussycode.services.llm import Grant, LlmService
    from ussycode.services.llm_usage import Tokens
    from ussycode.store import users
    from ussycode.store.db import Store

    store = Store(f"sqlite:///{tmp_path / 'u.db'}")
    store.migrate()
    settings = load_settings(data_dir=tmp_path)
    with store.engine.begin() as c:
        owner = users.create_user(c, "ann", "ssh-ed25519", "AAAA", "SHA256:ann")
    llm = LlmService(store, settings)
    grant = Grant(owner, "openai", llm.provider("openai"), {}, True)
    writes = 0
    real_write = store.write

    async def counted(fn):  # type: ignore[no-untyped-def]
        nonlocal writes
        writes += 1
        return await real_write(fn)

    with mock.patch.object(store, "write", counted):
        for _ in range(50):
            llm.record_later(grant, Tokens(3, 2))
        await asyncio.sleep(0.6)
        assert writes == 1
        usage = await llm.usage(Actor(owner, "ssh"))
        assert usage["day"]["tokens"] == 250 and usage["day"]["requests"] == 50

        llm.record_later(grant, Tokens(10, 0))  # read at once: written by `llm usage` itself, not after 0.25 s
        assert (await llm.usage(Actor(owner, "ssh")))["day"]["tokens"] == 260

        async def broken(fn):  # type: ignore[no-untyped-def]
            raise OSError("disk full")

        llm.record_later(grant, Tokens(1, 1))
        with mock.patch.object(store, "write", broken), pytest.raises(OSError):
            await llm.flush_usage()
        llm.record_later(grant, Tokens(1, 1))
        await llm.close()  # a stop writes what is left, the failed batch included
    with store.engine.connect() as c:
        total = c.exec_driver_sql("SELECT sum(input_tokens + output_tokens), sum(requests) FROM llm_usage").one()
    assert tuple(total) == (264, 53)
    store.close()
