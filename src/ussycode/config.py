"""Settings: one typed, frozen object built once at start-up.

Precedence, highest first: command-line flag > environment (``USSYCODE_<NAME>``) > config file (``--config``,
TOML) > default. Every field carries a description (a test fails if one does not); paths not set explicitly derive
from ``data_dir``.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class LlmProvider(BaseModel):
    """One LLM provider of the gateway (TOML ``[llm.providers.<name>]``). ``api_key``: the operator's platform key
    (used when the VM's owner has none of their own); ``api_format``: ``openai`` or ``anthropic`` (how requests are
    authenticated and usage is read)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    base_url: str
    api_key: str = ""
    api_format: str = "openai"
    needs_key: bool = True

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")) or any(c.isspace() for c in v):
            raise ValueError(f"base_url must be an http(s) URL, got {v!r}")
        return v.rstrip("/")

    @field_validator("api_format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v not in ("openai", "anthropic"):
            raise ValueError("api_format must be 'openai' or 'anthropic'")
        return v


BUILTIN_PROVIDERS: dict[str, LlmProvider] = {
    "openai": LlmProvider(base_url="https://api.openai.com"),
    "anthropic": LlmProvider(base_url="https://api.anthropic.com", api_format="anthropic"),
    "fireworks": LlmProvider(base_url="https://api.fireworks.ai/inference"),
    "ollama": LlmProvider(base_url="http://127.0.0.1:11434", needs_key=False),
    "vllm": LlmProvider(base_url="http://127.0.0.1:8000", needs_key=False),
}


class LlmSettings(BaseModel):
    """TOML ``[llm]``: providers (built-in ones can be overridden key by key), daily token budgets per tier (a
    missing tier or ``-1`` is unlimited), and the per-user request rate."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    providers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    budgets: dict[str, int] = Field(default_factory=lambda: {"newbie": 200_000, "citizen": 2_000_000,
                                                              "operator": 10_000_000, "admin": -1})
    requests_per_minute: int = Field(120, ge=1, le=100_000)

    @field_validator("providers")
    @classmethod
    def _names(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, spec in v.items():
            if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", name):
                raise ValueError(f"provider name {name!r}: use lower-case letters, digits and '-'")
            merged = {**BUILTIN_PROVIDERS[name].model_dump(), **spec} if name in BUILTIN_PROVIDERS else spec
            LlmProvider(**merged)  # refuse a bad one at start-up
        return v

    def provider(self, name: str) -> LlmProvider | None:
        base = BUILTIN_PROVIDERS.get(name)
        spec = self.providers.get(name)
        if spec is None:
            return base
        return LlmProvider(**({**base.model_dump(), **spec} if base else spec))

    def budget(self, tier: str) -> int | None:
        value = self.budgets.get(tier, -1)
        return None if value < 0 else value


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


class TlsMode(enum.StrEnum):
    INTERNAL = "internal"
    ACME = "acme"
    OFF = "off"


class RegistrationMode(enum.StrEnum):
    OPEN = "open"  # an unknown key may register itself (within the registration rate limits)
    CLOSED = "closed"  # only an admin adds accounts (`admin add-user`); the first account of an empty DB excepted


class RuntimeName(enum.StrEnum):
    AUTO = "auto"
    CONTAINER = "container"
    QEMU = "qemu"
    FIRECRACKER = "firecracker"


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def parse_addr(addr: str) -> tuple[str, int]:
    """``":2222"`` → ``("0.0.0.0", 2222)``; ``"127.0.0.1:8080"`` → ``("127.0.0.1", 8080)``; ``[::1]:22`` too."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid address {addr!r}: expected HOST:PORT or :PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="USSYCODE_", frozen=True, extra="forbid")

    data_dir: Path = Field(Path("/var/lib/ussycode"), description="DB, host keys, disks and run state live here.")
    images_dir: Path | None = Field(None, description="Built/pulled image cache; default <data-dir>/images.")
    domain: str = Field("localhost", description="VM URLs are <vm>.<domain>.")
    ssh_addr: str = Field(":2222", description="SSH gateway address (lobby and direct VM access).")
    https_addr: str = Field(":8443", description="Public HTTPS entry (Caddy) for VM URLs, the API and login.")
    http_addr: str = Field("127.0.0.1:8080", description="App server behind Caddy (API, auth, forward-auth).")
    admin_addr: str = Field("127.0.0.1:9090", description="Operators' address: Prometheus /metrics and /health "
                                                          "(the admin panel itself is https://<domain>/admin/).")
    smtp_addr: str = Field(":2525", description="Inbound mail (SMTP) address.")
    runtime: RuntimeName = Field(RuntimeName.AUTO, description="VM runtime: auto, container, qemu, firecracker.")
    tls: TlsMode = Field(TlsMode.INTERNAL, description="internal (Caddy's local CA), acme, or off (plain HTTP).")
    acme_email: str = Field("", description="Contact e-mail for ACME certificates (with --tls acme).")
    caddy_admin: str = Field("", description="Use this existing Caddy admin API instead of starting one.")
    database_url: str = Field("", description="SQLAlchemy URL; default SQLite at <data-dir>/ussycode.db.")
    default_image: str = Field("ussyuntu", description="Image used by `new` when --image is not given.")
    default_agent: str = Field("pi", pattern=r"^(pi|opencode|none)$",
                               description="The AI agent an interactive VM login starts: pi, opencode or none.")
    agent_run_seconds: int = Field(3600, ge=5, le=7 * 86400,
                                   description="How long an unattended agent run (new --prompt) may take before it "
                                               "is stopped and reported failed.")
    log_level: str = Field("INFO", description="Log level: DEBUG, INFO, WARNING, ERROR (any case).")
    log_format: LogFormat = Field(LogFormat.TEXT, description="Logs as text lines or one JSON object per line.")
    rate_per_minute: int = Field(120, description="Commands per minute per user (SSH one-shot and API).")
    rate_burst: int = Field(30, description="Burst size of the per-user command rate limit.")
    max_sessions_per_key: int = Field(20, description="Concurrent SSH sessions allowed per public key.")
    cname_claim_days: int = Field(7, ge=1, le=365,
                                  description="Days an unverified custom-domain claim (share cname) stays pending.")
    registration: RegistrationMode = Field(
        RegistrationMode.OPEN,
        description="open: an unknown SSH key may register an account; closed: only an admin adds accounts "
                    "('admin add-user'), except the first account on an empty database.")
    registrations_per_address: int = Field(
        5, ge=1, le=100_000,
        description="New accounts per hour from one source address (IPv6: per /64), as a burst that refills "
                    "evenly over the hour.")
    registrations_per_hour: int = Field(
        60, ge=1, le=1_000_000,
        description="New accounts per hour over the whole server, from all addresses together (same refill).")
    smtp_relay: str = Field("", description="host:port of the SMTP relay for outgoing mail (verification codes, "
                                            "mail from VMs); empty: no outgoing mail.")
    smtp_relay_user: str = Field("", description="User name for the SMTP relay (with --smtp-relay-password).")
    smtp_relay_password: str = Field("", description="Password for the SMTP relay.")
    mail_from: str = Field("", description="From address of outgoing mail; default ussycode@<domain>.")
    mail_per_hour: int = Field(100, ge=1, le=1_000_000, description="Inbound messages per hour per VM.")
    llm_secret_file: Path | None = Field(None, description="The key that encrypts stored LLM keys (created 0600); "
                                                            "default <data-dir>/llm.key.")
    routussy_url: str = Field("", description="Routussy (external access and billing service) base URL; empty: "
                                              "not used.")
    routussy_key: str = Field("", description="Shared secret for Routussy (prefer USSYCODE_ROUTUSSY_KEY: flags "
                                              "show in ps).")
    trusted_cidrs: str = Field("", description="Comma-separated address ranges whose new keys register without "
                                               "asking Routussy.")
    community_links: dict[str, str] = Field(default_factory=dict,
                                            description="TOML [community_links]: name = URL, shown by `community`.")
    llm: LlmSettings = Field(default_factory=lambda: LlmSettings.model_validate({}),
                             description="TOML [llm]: providers, budgets.")
    mail_unread_limit: int = Field(
        1000, ge=1, le=1_000_000,
        description="Unread messages in a VM's ~/Maildir/new at which receiving switches itself off.")

    @field_validator("ssh_addr", "https_addr", "http_addr", "admin_addr", "smtp_addr")
    @classmethod
    def _valid_addr(cls, v: str) -> str:
        parse_addr(v)
        return v

    @field_validator("log_level")
    @classmethod
    def _valid_log_level(cls, v: str) -> str:
        level = v.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("routussy_url")
    @classmethod
    def _valid_routussy(cls, v: str) -> str:
        if v and (not v.startswith(("http://", "https://")) or any(c.isspace() for c in v)):
            raise ValueError("--routussy-url must be an http(s) URL")
        return v.rstrip("/")

    @field_validator("trusted_cidrs")
    @classmethod
    def _valid_cidrs(cls, v: str) -> str:
        for part in filter(None, (p.strip() for p in v.split(","))):
            ipaddress.ip_network(part, strict=False)
        return v

    @property
    def trusted_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(p.strip(), strict=False) for p in self.trusted_cidrs.split(",") if p.strip()]

    @field_validator("smtp_relay")
    @classmethod
    def _valid_relay(cls, v: str) -> str:
        if v:
            host, _ = parse_addr(v)
            if not host:
                raise ValueError("--smtp-relay needs host:port")
        return v

    @field_validator("domain")
    @classmethod
    def _valid_domain(cls, v: str) -> str:
        v = v.strip().lower().rstrip(".")
        if not v or len(v) > 200 or any(c.isspace() or c in "/:@" for c in v):
            raise ValueError(f"invalid domain {v!r}")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _CONFIG_FILE is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=_CONFIG_FILE))
        return tuple(sources)

    # Derived paths -------------------------------------------------------------------------------------------
    @property
    def llm_secret_path(self) -> Path:
        return self.llm_secret_file or self.data_dir / "llm.key"

    @property
    def images_path(self) -> Path:
        return self.images_dir or self.data_dir / "images"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'ussycode.db'}"

    @property
    def host_key_path(self) -> Path:
        return self.data_dir / "ssh_host_ed25519_key"

    @property
    def gateway_key_path(self) -> Path:
        """The key the gateway uses to log in to guests (never the host key)."""
        return self.data_dir / "gateway_client_ed25519_key"

    @property
    def disks_dir(self) -> Path:
        return self.data_dir / "disks"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def caddy_dir(self) -> Path:
        return self.data_dir / "caddy"

    @property
    def sender(self) -> str:
        return self.mail_from or f"ussycode@{self.domain}"

    @property
    def public_scheme(self) -> str:
        return "http" if self.tls is TlsMode.OFF else "https"

    def public_url(self, host: str) -> str:
        _, port = parse_addr(self.https_addr)
        default = 80 if self.tls is TlsMode.OFF else 443
        suffix = "" if port == default else f":{port}"
        return f"{self.public_scheme}://{host}{suffix}"


_CONFIG_FILE: Path | None = None


def load_settings(config_file: Path | None = None, **flags: Any) -> Settings:
    """Build the settings: ``flags`` (only those given on the command line) override env, which overrides TOML."""
    global _CONFIG_FILE
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"config file {config_file} does not exist")
    _CONFIG_FILE = config_file
    try:
        return Settings(**{k: v for k, v in flags.items() if v is not None})
    finally:
        _CONFIG_FILE = None
