"""End-to-end tests reuse the integration fixtures (real server, managed Caddy, real VMs)."""

from __future__ import annotations

from ..integration.conftest import server, server_factory  # noqa: F401, TID252
from ..integration.web.conftest import needs_vms, web, web_factory  # noqa: F401, TID252
