"""The bundle of services a frontend hands to commands. Later features add their service here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ussycode.config import Settings
from ussycode.services.events import EventBus
from ussycode.services.ratelimit import RateLimiter
from ussycode.services.tokens import TokenService
from ussycode.services.users import UserService
from ussycode.services.vms import VmService
from ussycode.store.db import Store

if TYPE_CHECKING:
    from ussycode.services.admin import AdminService
    from ussycode.services.agents import AgentService
    from ussycode.services.arena import Arena
    from ussycode.services.llm import LlmService
    from ussycode.services.mail import MailService
    from ussycode.services.outbox import Outbox
    from ussycode.services.routes import RouteService
    from ussycode.services.sessions import SessionService
    from ussycode.services.shares import ShareService
    from ussycode.services.templates import TemplateCatalog


@dataclass
class Services:
    settings: Settings
    store: Store
    events: EventBus
    users: UserService
    vms: VmService
    limiter: RateLimiter
    tokens: TokenService | None = None
    # HTTPS URLs, sharing and browser sessions (set by services.routes.HttpsEntry).
    shares: ShareService | None = None
    sessions: SessionService | None = None
    routes: RouteService | None = None
    # Mail: inbound into VMs, and outgoing through the relay (set by the app at start-up).
    mail: MailService | None = None
    outbox: Outbox | None = None
    # Operating: the admin commands and panel.
    admin: AdminService | None = None
    # The LLM gateway's keys, budgets and usage.
    llm: LlmService | None = None
    # `new --prompt` / `--command` runs and the agents' states.
    agents: AgentService | None = None
    templates: TemplateCatalog | None = None
    arena: Arena | None = None
