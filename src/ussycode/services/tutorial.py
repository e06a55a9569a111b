"""The tutorial: ten lessons, each done when a check of *real state* passes (the VM runs, port 8080 answers, the
share is public, the token was used…), never by matching what was typed.

Lessons are data files (``ussycode/tutorial/NN-slug.toml``: ``title``, ``text``, ``hint``, ``check`` and the
check's parameters); an operator's ``<data-dir>/tutorial/NN-*.toml`` replaces the lesson of the same number or
adds one. ``{vm}``, ``{url}`` and ``{apex}`` in texts name the user's tutorial VM (``<handle>-tut``) and URLs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ussycode.auth.identity import Actor
from ussycode.errors import NotFound, UsageError
from ussycode.services.container import Services
from ussycode.store.schema import (
    api_tokens,
    audit_log,
    llm_usage,
    share_links,
    tutorial_lessons,
    utcnow,
    vm_public_ports,
    web_sessions,
)
from ussycode.store.vms import Vm
from ussycode.types import VmStatus

PACKAGED = Path(__file__).resolve().parent.parent / "tutorial"


@dataclass(frozen=True)
class Lesson:
    number: int
    title: str
    text: str
    hint: str
    check: str
    params: dict[str, Any]


# The lessons last read, by the files they came from (path, size, modification time) and when they were last
# looked at: an operator's edit shows within LESSONS_RESCAN seconds, and an unchanged set is not parsed again
# (``whoami`` reads them on every call).
LESSONS_RESCAN = 1.0
_parsed: tuple[str, float, tuple[tuple[str, int, int], ...], list[Lesson]] | None = None


def load_lessons(data_dir: Path) -> list[Lesson]:
    global _parsed
    now = time.monotonic()
    if _parsed is not None and _parsed[0] == str(data_dir) and now - _parsed[1] < LESSONS_RESCAN:
        return list(_parsed[3])
    files: dict[int, Path] = {}
    for base in (PACKAGED, Path(data_dir) / "tutorial"):
        if base.is_dir():
            for path in sorted(base.glob("[0-9][0-9]-*.toml")):
                files[int(path.name[:2])] = path
    try:
        stats = tuple((str(path), st.st_size, st.st_mtime_ns) for path in files.values() for st in (path.stat(),))
    except OSError:  # a file went away meanwhile: read what is there now, uncached
        stats = ()
    if stats and _parsed is not None and _parsed[0] == str(data_dir) and _parsed[2] == stats:
        lessons = _parsed[3]
    else:
        lessons = _parse(files)
    _parsed = (str(data_dir), now, stats, lessons) if stats else None
    return list(lessons)


def _parse(files: dict[int, Path]) -> list[Lesson]:
    lessons = []
    for number, path in sorted(files.items()):
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
        if doc.get("check") not in CHECKS:
            raise UsageError(f"tutorial lesson {path.name}: unknown check {doc.get('check')!r}")
        params = {k: v for k, v in doc.items() if k not in ("title", "text", "hint", "check")}
        lessons.append(Lesson(number, str(doc["title"]), str(doc["text"]).strip(), str(doc.get("hint", "")),
                              str(doc["check"]), params))
    return lessons


@dataclass
class Probe:
    """What a check may look at: the services, the user, their tutorial VM (None if it does not exist)."""

    services: Services
    actor: Actor
    vm: Vm | None
    params: dict[str, Any]

    async def in_vm(self, script: str, timeout: float = 20.0) -> tuple[bool, str]:
        if self.vm is None or self.vm.status is not VmStatus.RUNNING:
            return False, ""
        result = await self.services.vms.runtime.exec(self.vm.id, ["sh", "-c", script], timeout=timeout)
        return result.exit_status == 0, result.stdout.decode(errors="replace").strip()

    async def read(self, fn: Callable[[sa.Connection], Any]) -> Any:
        return await self.services.store.read(fn)


Check = Callable[[Probe], Awaitable[tuple[bool, str]]]


async def _vm_running(p: Probe) -> tuple[bool, str]:
    if p.vm is None:
        return False, "there is no VM of that name yet"
    return p.vm.status is VmStatus.RUNNING, f"it is {p.vm.status}"


async def _file_in_vm(p: Probe) -> tuple[bool, str]:
    name = str(p.params.get("file", "hello.txt"))
    ok, _ = await p.in_vm(f'test -s "$HOME/{name}"')
    return ok, f"~/{name} is there" if ok else f"~/{name} is not in the VM yet"


async def _port_answers(p: Probe) -> tuple[bool, str]:
    port = int(p.params.get("port", 8080))
    if p.vm is None or p.vm.status is not VmStatus.RUNNING:
        return False, "the VM is not running"
    try:
        reader, writer = await asyncio.wait_for(p.services.vms.runtime.open_connection(p.vm.id, port), 5)
    except (OSError, TimeoutError, Exception):  # noqa: BLE001 - nothing listens: the lesson is not done
        return False, f"nothing answers on port {port} yet"
    try:
        writer.write(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
    except (OSError, TimeoutError):
        status = b""
    finally:
        writer.close()
    ok = status.startswith(b"HTTP/")
    return ok, f"port {port} answers {status.decode(errors='replace').strip()}" if ok else \
        f"port {port} accepts connections but does not speak HTTP"


async def _browser_session(p: Probe) -> tuple[bool, str]:
    if p.vm is None:
        return False, "there is no tutorial VM"
    vm_id, now = p.vm.id, utcnow()
    count = await p.read(lambda c: c.execute(sa.select(sa.func.count()).select_from(web_sessions).where(
        web_sessions.c.vm_id == vm_id, web_sessions.c.user_id == p.actor.id, web_sessions.c.revoked_at.is_(None),
        web_sessions.c.expires_at > now)).scalar_one())
    return bool(count), "a browser has opened the VM's URL" if count else "no browser has opened the URL yet"


async def _package_after_restart(p: Probe) -> tuple[bool, str]:
    package = str(p.params.get("package", "cowsay"))
    ok, out = await p.in_vm(f"stat -c %Y /var/lib/dpkg/info/{package}.list")
    if not ok or not out.isdigit():
        return False, f"{package} is not installed"
    installed = dt.datetime.fromtimestamp(int(out), dt.UTC).replace(tzinfo=None)
    name = p.vm.name if p.vm else ""
    booted = await p.read(lambda c: c.execute(sa.select(sa.func.max(audit_log.c.at)).where(
        audit_log.c.action == "vm.start", audit_log.c.target == name)).scalar())
    if booted is None or booted <= installed:
        return False, f"{package} is installed; now restart the VM"
    return True, f"{package} was installed and the VM has restarted since"


async def _git_commit(p: Probe) -> tuple[bool, str]:
    ok, _ = await p.in_vm('git -C "$HOME/project" rev-parse --verify -q HEAD')
    return ok, "~/project has a commit" if ok else "no commit in ~/project yet"


async def _shared(p: Probe) -> tuple[bool, str]:
    if p.vm is None:
        return False, "there is no tutorial VM"
    vm_id = p.vm.id

    def read(c: sa.Connection) -> tuple[int, int]:
        public = c.execute(sa.select(sa.func.count()).select_from(vm_public_ports).where(
            vm_public_ports.c.vm_id == vm_id, vm_public_ports.c.port == 8080)).scalar_one()
        links = c.execute(sa.select(sa.func.count()).select_from(share_links).where(
            share_links.c.vm_id == vm_id)).scalar_one()
        return int(public), int(links)

    public, links = await p.read(read)
    missing = [what for what, n in (("public", public), ("a share link", links)) if not n]
    return not missing, "public, with a share link" if not missing else "still missing: " + ", ".join(missing)


async def _llm_used(p: Probe) -> tuple[bool, str]:
    n = await p.read(lambda c: c.execute(sa.select(sa.func.coalesce(sa.func.sum(llm_usage.c.requests), 0)).where(
        llm_usage.c.user_id == p.actor.id)).scalar_one())
    return bool(n), f"{n} LLM requests so far" if n else "no LLM request yet"


async def _token_used(p: Probe) -> tuple[bool, str]:
    n = await p.read(lambda c: c.execute(sa.select(sa.func.count()).select_from(api_tokens).where(
        api_tokens.c.user_id == p.actor.id, api_tokens.c.last_used_at.is_not(None))).scalar_one())
    return bool(n), "a token has been used" if n else "no token has been used yet"


async def _vm_gone(p: Probe) -> tuple[bool, str]:
    if p.vm is not None:
        return False, "the tutorial VM still exists"
    name = str(p.params.get("vm", ""))
    made = await p.read(lambda c: c.execute(sa.select(sa.func.count()).select_from(audit_log).where(
        audit_log.c.action == "vm.create", audit_log.c.target == name,
        audit_log.c.actor_id == p.actor.id)).scalar_one())
    return bool(made), "the tutorial VM is gone" if made else "make the tutorial VM first (lesson 1)"


CHECKS: dict[str, Check] = {
    "vm_running": _vm_running, "file_in_vm": _file_in_vm, "port_answers": _port_answers,
    "browser_session": _browser_session, "package_after_restart": _package_after_restart,
    "git_commit": _git_commit, "shared": _shared, "llm_used": _llm_used, "token_used": _token_used,
    "vm_gone": _vm_gone,
}


class Tutorial:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.lessons = load_lessons(services.settings.data_dir)

    def vm_name(self, actor: Actor) -> str:
        return f"{actor.handle}-tut"

    def lesson(self, number: int) -> Lesson:
        found = next((lesson for lesson in self.lessons if lesson.number == number), None)
        if found is None:
            raise NotFound(f"no lesson {number}; there are {len(self.lessons)}")
        return found

    def render(self, actor: Actor, text: str) -> str:
        vm = self.vm_name(actor)
        s = self.services.settings
        return text.replace("{vm}", vm).replace("{url}", self.services.vms.url(vm)).replace(
            "{apex}", s.public_url(s.domain))

    async def check(self, actor: Actor, lesson: Lesson) -> tuple[bool, str]:
        vm = await self.services.vms.by_name(self.vm_name(actor))
        if vm is not None and vm.owner_id != actor.id:
            vm = None
        params = {"vm": self.vm_name(actor), **lesson.params}
        return await CHECKS[lesson.check](Probe(self.services, actor, vm, params))

    async def outcomes(self, actor: Actor) -> dict[int, str]:
        """Lesson number -> recorded outcome (remembered until the next write)."""
        rows = await self.services.store.read_cached(("tutorial", actor.id), lambda c: c.execute(sa.select(
            tutorial_lessons.c.lesson, tutorial_lessons.c.outcome).where(tutorial_lessons.c.user_id == actor.id)).all())
        return {int(n): str(o) for n, o in rows}

    async def record(self, actor: Actor, number: int, outcome: str) -> None:
        def tx(c: sa.Connection) -> None:
            c.execute(tutorial_lessons.delete().where(tutorial_lessons.c.user_id == actor.id,
                                                      tutorial_lessons.c.lesson == number))
            c.execute(tutorial_lessons.insert().values(user_id=actor.id, lesson=number, outcome=outcome,
                                                       at=utcnow()))

        await self.services.store.write(tx)

    async def reset(self, actor: Actor) -> None:
        await self.services.store.write(lambda c: c.execute(
            tutorial_lessons.delete().where(tutorial_lessons.c.user_id == actor.id)))

    async def current(self, actor: Actor) -> Lesson | None:
        seen = await self.outcomes(actor)
        return next((lesson for lesson in self.lessons if lesson.number not in seen), None)

    async def status(self, actor: Actor) -> list[dict[str, Any]]:
        """Every lesson with ``done`` re-checked against real state now (or recorded done earlier: a removed VM
        does not undo the lessons it served)."""
        seen = await self.outcomes(actor)
        out = []
        for lesson in self.lessons:
            passes, _ = await self.check(actor, lesson)
            out.append({"lesson": lesson.number, "title": lesson.title,
                        "done": passes or seen.get(lesson.number) == "done"})
        return out
