"""LLM access for VMs: the owner's keys (sealed at rest), which key and upstream a request uses, budgets, usage.

Keys: ``llm-key set`` stores the owner's own key for a provider, encrypted with AES-GCM (``cryptography``) under a
32-byte data key kept in ``--llm-secret-file`` (created ``0600``); the associated data binds each sealed key to its
user and provider, so a row copied to another user does not open. A key is never logged, printed or returned:
``llm-key list`` shows its last four characters.

A gateway request (``metadata/llm.py``) asks :meth:`LlmService.authorize` for the VM's owner: unknown provider ->
404, no key (the owner's own, else the operator's platform key; ``ollama``/``vllm``/keyless custom providers need
none) -> 401 naming the ``llm-key set`` to run, over the day's token budget of the owner's tier or the per-user
request rate -> 429 with the reset time, all before the upstream is called. After the answer,
:meth:`LlmService.record` adds the tokens the upstream reported.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ussycode import telemetry
from ussycode.auth.identity import Actor
from ussycode.config import LlmProvider, Settings
from ussycode.errors import NotFound, RateLimited, Suspended, Unauthenticated, UsageError
from ussycode.services.llm_usage import Tokens
from ussycode.services.ratelimit import RateLimiter
from ussycode.services.routussy import Routussy
from ussycode.store import audit
from ussycode.store import llm as q
from ussycode.store import users as userq
from ussycode.store import vms as vmq
from ussycode.store.db import Store
from ussycode.store.schema import iso, utcnow
from ussycode.store.users import User
from ussycode.tasks import TaskGroup

log = logging.getLogger(__name__)
NONCE = 12
INPUTS_TTL = 2.0
USAGE_FLUSH_SECONDS = 0.25  # usage counted within this window is written in one transaction
INPUTS_MAX = 10_000
ROUTUSSY = "routussy"
MAX_KEY_LEN = 4096
PROVIDER_RE_HELP = "a provider name such as openai, anthropic, fireworks (see 'llm usage' for the list)"


def load_or_create_data_key(path: Path) -> bytes:
    """The 32-byte data key, made on first use with mode 0600 (refuses a file of the wrong size)."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = AESGCM.generate_key(bit_length=256)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key
    if len(key) != 32:
        raise ValueError(f"{path} is not a 32-byte key")
    return key


class KeyBox:
    """Seal and open provider keys (AES-256-GCM, random nonce, associated data ``user:provider``)."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, user_id: str, provider: str, secret: str) -> bytes:
        nonce = secrets.token_bytes(NONCE)
        return nonce + self._aead.encrypt(nonce, secret.encode(), f"{user_id}:{provider}".encode())

    def open(self, user_id: str, provider: str, sealed: bytes) -> str | None:
        try:
            return self._aead.decrypt(sealed[:NONCE], sealed[NONCE:], f"{user_id}:{provider}".encode()).decode()
        except (InvalidTag, ValueError, UnicodeDecodeError):
            return None


@dataclass(frozen=True)
class Grant:
    """What a gateway request may use: the upstream, the credential headers, and whom to bill."""

    owner: User
    provider: str
    upstream: LlmProvider
    auth_headers: dict[str, str]
    byok: bool


def next_midnight(now: dt.datetime) -> dt.datetime:
    return dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time())


def validate_key(text: str) -> str:
    key = text.strip()
    if not key:
        raise UsageError("no key given: pipe it on stdin, e.g. 'ssh host llm-key set openai < key.txt'")
    if len(key) > MAX_KEY_LEN or any(not (33 <= ord(ch) < 127) for ch in key):
        raise UsageError("that does not look like an API key (printable ASCII without spaces, at most 4096)")
    return key


class LlmService:
    def __init__(self, store: Store, settings: Settings, routussy: Routussy | None = None) -> None:
        self.store = store
        self.settings = settings
        self.routussy = routussy
        self.box = KeyBox(load_or_create_data_key(settings.llm_secret_path))
        # A request's inputs (owner, sealed key, fingerprint) are kept INPUTS_TTL seconds per VM and provider, and
        # dropped at once when the owner's keys change (set_key, remove_key) or an operator changes the account
        # (forget_user). Today's tokens per user are counted here as they are recorded (this process is the only
        # writer), read from the database once per user and day.
        self._inputs: dict[tuple[str, str], tuple[float, User | None, bytes | None, str]] = {}
        self._used: dict[tuple[str, dt.date], int] = {}
        self.tasks = TaskGroup("llm")  # usage writes, after the answer has gone to the VM
        self._pending: dict[tuple[str, dt.date, str], list[int]] = {}  # input, output, requests not yet written
        self._touched: dict[tuple[str, str], dt.datetime] = {}  # stored keys used since the last write
        self._flush_due = False
        self._flush_lock = asyncio.Lock()
        self.limiter = RateLimiter(settings.llm.requests_per_minute, max(10, settings.llm.requests_per_minute // 4),
                                   name="llm")

    def forget_user(self, user_id: str) -> None:
        self._inputs = {k: v for k, v in self._inputs.items() if v[1] is None or v[1].id != user_id}

    def provider(self, name: str) -> LlmProvider:
        if name == ROUTUSSY and self.routussy is not None:
            return self.routussy.provider()
        found = self.settings.llm.provider(name) if len(name) <= 32 else None
        if found is None:
            raise NotFound(f"unknown LLM provider {name[:32]!r}; this server has: {', '.join(self.providers())}")
        return found

    def providers(self) -> list[str]:
        from ussycode.config import BUILTIN_PROVIDERS

        extra = {ROUTUSSY} if self.routussy is not None else set()
        return sorted(set(BUILTIN_PROVIDERS) | set(self.settings.llm.providers) | extra)

    # --- keys ---------------------------------------------------------------------------------------------------
    async def set_key(self, actor: Actor, provider: str, text: str) -> bool:
        upstream = self.provider(provider)
        if not upstream.needs_key:
            raise UsageError(f"{provider} needs no key: it is an endpoint of this server's operator")
        key = validate_key(text)
        sealed = self.box.seal(actor.id, provider, key)

        def tx(c: Any) -> bool:
            replaced = q.put_key(c, actor.id, provider, sealed, key[-4:], utcnow())
            audit.record(c, actor_id=actor.id, source=actor.source, action="llm.key_set", target=provider)
            return replaced

        try:
            return await self.store.write(tx)
        finally:
            self.forget_user(actor.id)

    async def list_keys(self, actor: Actor) -> list[dict[str, Any]]:
        rows = await self.store.read(lambda c: q.keys_of(c, actor.id))
        return [{"provider": r.provider, "hint": "…" + r.hint, "created_at": iso(r.created_at),
                 "last_used_at": iso(r.last_used_at)} for r in rows]

    async def remove_key(self, actor: Actor, provider: str) -> None:
        def tx(c: Any) -> bool:
            gone = q.remove_key(c, actor.id, provider[:32])
            if gone:
                audit.record(c, actor_id=actor.id, source=actor.source, action="llm.key_remove", target=provider)
            return gone

        gone = await self.store.write(tx)
        self.forget_user(actor.id)
        if not gone:
            raise NotFound(f"you have no key for {provider[:32]!r}; see 'llm-key list'")

    # --- the gateway --------------------------------------------------------------------------------------------
    async def authorize(self, vm_id: str, provider: str) -> Grant:
        """Everything is checked here, before the upstream is called (see the module docstring)."""
        upstream = self.provider(provider)
        today = utcnow().date()

        owner, sealed, fingerprint = await self._request_inputs(vm_id, provider)
        if owner is None:
            raise NotFound("this VM no longer exists")
        if owner.suspended:
            raise Suspended(owner.suspend_reason)
        budget = self.settings.llm.budget(str(owner.trust_level))
        if budget is not None and await self._used_today(owner.id, today) >= budget:
            reset = next_midnight(utcnow())
            telemetry.RATE_LIMITED.labels("llm_budget").inc()
            raise RateLimited(f"the daily LLM budget of {budget} tokens ({owner.trust_level}) is used up; it resets "
                              f"at {iso(reset)}", retry_after=(reset - utcnow()).total_seconds())
        self.limiter.take(owner.id)
        if provider == ROUTUSSY and self.routussy is not None:
            return Grant(owner, provider, upstream, self.routussy.llm_headers(fingerprint), False)
        key, byok = None, False
        if sealed is not None:
            key = self.box.open(owner.id, provider, sealed)
            if key is None:
                log.error("a stored %s key of %s does not open (data key changed?)", provider, owner.handle)
            byok = key is not None
        if key is None and upstream.api_key:
            key = upstream.api_key
        if key is None and upstream.needs_key:
            raise Unauthenticated(f"no key for {provider}: its owner can run 'llm-key set {provider}' (the key is "
                                  "read from stdin)")
        headers: dict[str, str] = {}
        if key is not None:
            headers = {"x-api-key": key} if upstream.api_format == "anthropic" else {"authorization": f"Bearer {key}"}
        return Grant(owner, provider, upstream, headers, byok)

    async def _request_inputs(self, vm_id: str, provider: str) -> tuple[User | None, bytes | None, str]:
        now = time.monotonic()
        hit = self._inputs.get((vm_id, provider))
        if hit is not None and hit[0] > now:
            return hit[1], hit[2], hit[3]

        def read(c: Any) -> tuple[User | None, bytes | None, str]:
            vm = vmq.by_id(c, vm_id)
            owner = userq.by_id(c, vm.owner_id) if vm is not None else None
            if owner is None:
                return None, None, ""
            keys = userq.keys_of(c, owner.id)
            return owner, q.sealed_key(c, owner.id, provider), keys[0].fingerprint if keys else ""

        found = await self.store.read(read)
        if len(self._inputs) > INPUTS_MAX:
            self._inputs.clear()
        self._inputs[(vm_id, provider)] = (now + INPUTS_TTL, *found)
        return found

    async def _used_today(self, user_id: str, today: dt.date) -> int:
        used = self._used.get((user_id, today))
        if used is None:
            used = await self.store.read(lambda c: q.tokens_since(c, user_id, today))
            if len(self._used) > INPUTS_MAX:
                self._used = {k: v for k, v in self._used.items() if k[1] == today}
            self._used[(user_id, today)] = max(used, self._used.get((user_id, today), 0))
        return self._used[(user_id, today)]

    def record_later(self, grant: Grant, tokens: Tokens) -> None:
        """Count the tokens now (budgets see them at once) and write them without holding up the answer.

        Writes are batched: what the next USAGE_FLUSH_SECONDS brings is added up per user, day and provider and
        written in one transaction (a busy gateway makes one write a batch, not one a request). A crash loses at
        most that window's counts; a stop, and every ``llm usage``, writes them first."""
        now = utcnow()
        key = (grant.owner.id, now.date())
        if key in self._used:
            self._used[key] += tokens.total
        self._count((grant.owner.id, now.date(), grant.provider), tokens.input, tokens.output, 1)
        if grant.byok:
            self._touched[(grant.owner.id, grant.provider)] = now
        telemetry.LLM_TOKENS.labels(grant.provider, "input").inc(tokens.input)
        telemetry.LLM_TOKENS.labels(grant.provider, "output").inc(tokens.output)
        if not self._flush_due:
            self._flush_due = True
            self.tasks.spawn(self._flush_soon(), "usage")

    def _count(self, key: tuple[str, dt.date, str], inp: int, out: int, requests: int) -> None:
        """Add to the usage not yet written for (user, day, provider)."""
        row = self._pending.setdefault(key, [0, 0, 0])
        row[0] += inp
        row[1] += out
        row[2] += requests

    async def _flush_soon(self) -> None:
        await asyncio.sleep(USAGE_FLUSH_SECONDS)
        await self.flush_usage()

    async def flush_usage(self) -> None:
        """Write the counted usage now; returns once everything counted before the call is in the database."""
        async with self._flush_lock:
            self._flush_due = False
            pending, self._pending = self._pending, {}
            touched, self._touched = self._touched, {}
            if not pending and not touched:
                return

            def tx(c: Any) -> None:
                for (user_id, day, provider), (inp, out, requests) in pending.items():
                    q.add_usage(c, user_id, day, provider, inp, out, requests)
                for (user_id, provider), when in touched.items():
                    q.touch_key(c, user_id, provider, when)

            try:
                await self.store.write(tx)
            except Exception:
                for k, (inp, out, requests) in pending.items():  # kept for the next write
                    self._count(k, inp, out, requests)
                self._touched = {**touched, **self._touched}
                raise

    async def close(self) -> None:
        await self.tasks.drain(10.0)
        await self.flush_usage()
        await self.tasks.close()

    # --- usage --------------------------------------------------------------------------------------------------
    async def usage(self, actor: Actor) -> dict[str, Any]:
        await self.flush_usage()  # usage of answers that just ended: include it
        now = utcnow()
        month_start = now.date().replace(day=1)
        rows = await self.store.read(lambda c: q.usage_rows(c, actor.id, month_start))
        user = await self.store.read(lambda c: userq.by_id(c, actor.id))
        tier = str(user.trust_level) if user else str(actor.user.trust_level)
        budget = self.settings.llm.budget(tier)

        def total(selected: list[dict[str, Any]]) -> tuple[int, int]:
            return (sum(r["input_tokens"] + r["output_tokens"] for r in selected),
                    sum(r["requests"] for r in selected))

        day_tokens, day_requests = total([r for r in rows if r["day"] == now.date()])
        month_tokens, month_requests = total(rows)
        providers: dict[str, dict[str, int]] = {}
        for r in rows:
            p = providers.setdefault(r["provider"], {"tokens": 0, "requests": 0, "input_tokens": 0,
                                                     "output_tokens": 0})
            p["tokens"] += r["input_tokens"] + r["output_tokens"]
            p["requests"] += r["requests"]
            p["input_tokens"] += r["input_tokens"]
            p["output_tokens"] += r["output_tokens"]
        first_next_month = (month_start + dt.timedelta(days=32)).replace(day=1)
        return {"day": {"tokens": day_tokens, "requests": day_requests, "budget": budget,
                        "resets_at": iso(next_midnight(now))},
                "month": {"tokens": month_tokens, "requests": month_requests,
                          "resets_at": iso(dt.datetime.combine(first_next_month, dt.time()))},
                "providers": providers}
