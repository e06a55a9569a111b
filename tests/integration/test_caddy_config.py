"""Every builder output is accepted by the real Caddy binary (`caddy validate`), for every TLS mode."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from ussycode.proxy.manager import caddy_binary
from ussycode.proxy.routes import Route, RouteKind, ServerSettings, TlsMode, build_config

ROUTES = [
    Route(RouteKind.VM, "web.ussy.test", "unix//run/u/bridges/vm1-8080.sock", auth_url="http://127.0.0.1:8080/a",
          app="127.0.0.1:8080", proxy_key="k"),
    Route(RouteKind.PORT, "3000-web.ussy.test", "unix//run/u/bridges/vm1-3000.sock", public=True, app="127.0.0.1:8080"),
    Route(RouteKind.CNAME, "shop.example.com", "unix//run/u/bridges/vm1-8080.sock", auth_url="http://[::1]:8080/a?x=1",
          app="[::1]:8080"),
    Route(RouteKind.VM, "pub.ussy.test", "127.0.0.1:9", public=True, app="127.0.0.1:8080"),
]


@pytest.mark.parametrize("mode", list(TlsMode))
@pytest.mark.parametrize("ask", ["", "http://127.0.0.1:8080/__ussy/tls-ask"])
def test_caddy_accepts_config(tmp_path: Path, mode: TlsMode, ask: str) -> None:
    settings = ServerSettings(
        domain="ussy.test",
        https_addr="127.0.0.1:18443",
        tls=mode,
        acme_email="ops@ussy.test",
        ask_url=ask,
        admin_listen=f"unix/{tmp_path}/admin.sock",
        storage_dir=str(tmp_path / "storage"),
    )
    path = tmp_path / "config.json"
    path.write_text(json.dumps(build_config(settings, ROUTES)))
    env = {"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "d"), "XDG_CONFIG_HOME": str(tmp_path / "c")}
    result = subprocess.run(
        [caddy_binary(), "validate", "--config", str(path)], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Valid configuration" in result.stdout + result.stderr
