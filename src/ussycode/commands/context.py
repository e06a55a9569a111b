"""What a command gets: who is acting, where output goes, whether a person can answer questions.

Commands never see a transport (SSH channel, HTTP request). A frontend that can do more offers it as a
capability: ``prompt`` (ask the person a question) and ``attach`` (hand the terminal to a VM shell).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ussycode.auth.identity import Actor
from ussycode.services.container import Services


class Output:
    """Collects or streams a command's stdout and stderr."""

    def __init__(self, write: Callable[[str], None] | None = None,
                 write_err: Callable[[str], None] | None = None) -> None:
        self._out: list[str] = []
        self._err: list[str] = []
        self._write = write
        self._write_err = write_err

    def print(self, text: str = "") -> None:
        line = text + "\n"
        if self._write:
            self._write(line)
        else:
            self._out.append(line)

    def error(self, text: str) -> None:
        line = text + "\n"
        if self._write_err:
            self._write_err(line)
        else:
            self._err.append(line)

    def json(self, value: Any) -> None:
        self.print(json.dumps(value, indent=2, sort_keys=False))

    @property
    def stdout(self) -> str:
        return "".join(self._out)

    @property
    def stderr(self) -> str:
        return "".join(self._err)


Prompt = Callable[[str], Awaitable[str | None]]
Attach = Callable[[str, str | None], Awaitable[int]]
SecretReader = Callable[[str], Awaitable[str | None]]


@dataclass
class CommandContext:
    actor: Actor
    services: Services
    out: Output
    interactive: bool = False
    prompt: Prompt | None = None
    attach: Attach | None = None
    # A secret from the person without echo (interactive), or the first line of stdin (ssh host cmd < file).
    read_secret: SecretReader | None = None
    # The person's terminal width (None: not a terminal, or not known).
    width: int | None = None

    async def secret(self, question: str) -> str | None:
        """A secret the person types (not echoed) or pipes on stdin; ``None`` when there is no way to get one."""
        if self.read_secret is None:
            return None
        return await self.read_secret(question)

    async def ask(self, question: str) -> str | None:
        """Ask the person; ``None`` when nobody can answer (non-interactive) or they hung up."""
        if not self.interactive or self.prompt is None:
            return None
        return await self.prompt(question)
