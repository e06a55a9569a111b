"""VM templates: ``new --template=<name>`` and ``template list``.

A template is a directory with ``template.toml`` and an optional ``setup.sh``; shipped ones live in the package
(``ussycode/templates``), an operator's in ``<data-dir>/templates`` (same name: the operator's wins).
``template.toml``: ``description``, and optionally ``image``, ``cpu``, ``memory_mb``, ``disk_gb``, ``env`` (a
table), ``public_ports`` (made public once the VM runs), ``agent`` and ``prompt`` (the agent's first task).
``setup.sh`` runs once, as the VM's user, after the first boot (``~/.ussycode/setup.log``); flags given to ``new``
override the template's values.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ussycode.errors import NotFound, UsageError
from ussycode.services.catalog import NAME_RE, item_dir, item_dirs

PACKAGED = Path(__file__).resolve().parent.parent / "templates"
MARKER = "template.toml"
MAX_SETUP = 64 * 1024


class TemplateSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    description: str = Field(max_length=300)
    image: str | None = None
    cpu: int | None = Field(None, ge=1, le=64)
    memory_mb: int | None = Field(None, ge=256, le=262144)
    disk_gb: int | None = Field(None, ge=1, le=2048)
    env: dict[str, str] = Field(default_factory=dict)
    public_ports: list[int] = Field(default_factory=list)
    agent: str | None = Field(None, pattern=r"^(pi|opencode|none)$")
    prompt: str | None = Field(None, max_length=16000)


@dataclass(frozen=True)
class Template:
    name: str
    spec: TemplateSpec
    setup: str = ""
    source: str = "shipped"
    problems: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        s = self.spec
        return {"name": self.name, "description": s.description, "image": s.image, "cpu": s.cpu,
                "memory_mb": s.memory_mb, "disk_gb": s.disk_gb, "public_ports": list(s.public_ports),
                "agent": s.agent, "has_prompt": bool(s.prompt), "has_setup": bool(self.setup), "source": self.source}


def _load(directory: Path, source: str) -> Template:
    try:
        spec = TemplateSpec(**tomllib.loads((directory / MARKER).read_text(encoding="utf-8")))
    except (OSError, tomllib.TOMLDecodeError, ValidationError, TypeError) as exc:
        raise UsageError(f"template {directory.name} is broken: {str(exc).splitlines()[0][:200]}") from None
    setup_file = directory / "setup.sh"
    setup = ""
    if setup_file.is_file():
        if setup_file.stat().st_size > MAX_SETUP:
            raise UsageError(f"template {directory.name}: setup.sh is over {MAX_SETUP // 1024} KiB")
        setup = setup_file.read_text(encoding="utf-8")
    return Template(directory.name, spec, setup, source)


class TemplateCatalog:
    def __init__(self, data_dir: Path) -> None:
        self.dirs = [(PACKAGED, "shipped"), (Path(data_dir) / "templates", "operator")]

    def _bases(self) -> list[Path]:
        return [base for base, _ in self.dirs]

    def all(self) -> list[Template]:
        sources = dict(self.dirs)
        found: list[Template] = []
        for directory in item_dirs(self._bases(), MARKER).values():
            try:
                found.append(_load(directory, sources[directory.parent]))
            except UsageError:
                continue  # a broken operator template is left out of the list; `new` says why
        return sorted(found, key=lambda t: t.name)

    def get(self, name: str) -> Template:
        name = name.strip().lower()
        if not NAME_RE.fullmatch(name):
            raise UsageError(f"invalid template name {name[:40]!r}")
        directory = item_dir(self._bases(), name, MARKER)
        if directory is None:
            raise NotFound(f"no template {name!r}; see 'template list'")
        return _load(directory, dict(self.dirs)[directory.parent])
