"""Tables. Migrations in ``migrations/versions`` create exactly these (a test compares them)."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

metadata = sa.MetaData()


def utcnow() -> dt.datetime:
    """Naive UTC (both SQLite and PostgreSQL store it the same way)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0)


def iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.replace(microsecond=0).isoformat() + "Z"


users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("handle", sa.String(20), nullable=False, unique=True),
    sa.Column("email", sa.String(254), nullable=True, unique=True),
    sa.Column("trust_level", sa.String(16), nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    # Operating (migration 0006): a suspended account keeps its data but can do nothing; quota overrides the
    # tier's limits key by key ({"vms": 5, "cpu": 2, ...}; a missing key keeps the tier's value).
    sa.Column("suspended_at", sa.DateTime, nullable=True),
    sa.Column("suspend_reason", sa.String(200), nullable=False, server_default=""),
    sa.Column("quota", sa.JSON, nullable=True),
)

ssh_keys = sa.Table(
    "ssh_keys",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("fingerprint", sa.String(64), nullable=False, unique=True),
    sa.Column("key_type", sa.String(40), nullable=False),
    sa.Column("public_key", sa.Text, nullable=False),
    sa.Column("comment", sa.String(200), nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime, nullable=False),
)

vms = sa.Table(
    "vms",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(30), nullable=False, unique=True),
    sa.Column("owner_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("image", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    # What the owner asked for: "running" or "stopped". The reconciler makes reality match it.
    sa.Column("desired", sa.String(16), nullable=False),
    sa.Column("cpu", sa.Integer, nullable=False),
    sa.Column("memory_mb", sa.Integer, nullable=False),
    sa.Column("disk_gb", sa.Integer, nullable=False),
    sa.Column("env", sa.JSON, nullable=False),
    sa.Column("runtime", sa.String(16), nullable=False),
    sa.Column("runtime_state", sa.JSON, nullable=False),
    sa.Column("error", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    # First host uid/gid of the VM's private id range (its user namespace: guest 0..65535 = host id_base..),
    # allocated when the VM is made and freed only with its row, i.e. when the VM and its disk are gone.
    sa.Column("id_base", sa.BigInteger, nullable=True),
    sa.Index("uq_vms_id_base", "id_base", unique=True),
    sa.Index("ix_vms_status_runtime", "status", "runtime"),
)

vm_tags = sa.Table(
    "vm_tags",
    metadata,
    sa.Column("vm_id", sa.String(32), sa.ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("tag", sa.String(40), primary_key=True),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime, nullable=False, index=True),
    sa.Column("actor_id", sa.String(32), nullable=True, index=True),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.String(200), nullable=False, server_default=""),
    sa.Column("detail", sa.JSON, nullable=False),
    sa.Index("ix_audit_log_action_id", "action", "id"),
    sa.Index("ix_audit_log_target_id", "target", "id"),
)

# --- Sharing, browser sessions, API tokens, custom domains (migration 0002) ---------------------------------

vm_public_ports = sa.Table(
    "vm_public_ports",
    metadata,
    sa.Column("vm_id", sa.String(32), sa.ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("port", sa.Integer, primary_key=True),  # 8080 is the VM's main URL
)

vm_shares = sa.Table(
    "vm_shares",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("vm_id", sa.String(32), sa.ForeignKey("vms.id", ondelete="CASCADE"), nullable=False, index=True),
    # Exactly one of user_id / email: a share by handle resolves to the user; by e-mail it waits for that e-mail.
    sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=True),
    sa.Column("email", sa.String(254), nullable=True),
    sa.Column("created_by", sa.String(32), nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.UniqueConstraint("vm_id", "user_id", name="uq_vm_shares_user"),
    sa.UniqueConstraint("vm_id", "email", name="uq_vm_shares_email"),
)

share_links = sa.Table(
    "share_links",
    metadata,
    sa.Column("id", sa.String(16), primary_key=True),  # short public id (`share show`, `share remove-link`)
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),  # sha256 of the token; never stored
    sa.Column("vm_id", sa.String(32), sa.ForeignKey("vms.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("port", sa.Integer, nullable=False, server_default="8080"),  # the one URL it opens
    sa.Column("created_by", sa.String(32), nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("expires_at", sa.DateTime, nullable=True),
    sa.Column("uses", sa.Integer, nullable=False, server_default="0"),
)

web_sessions = sa.Table(
    "web_sessions",
    metadata,
    sa.Column("id_hash", sa.String(64), primary_key=True),  # sha256 of the cookie secret
    sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("host", sa.String(255), nullable=False),  # the host the cookie belongs to (apex or a VM host)
    sa.Column("parent_hash", sa.String(64), nullable=True, index=True),  # VM-host sessions hang off the apex one
    sa.Column("vm_id", sa.String(32), nullable=True),  # a VM-host session opens that VM only (migration 0003)
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("expires_at", sa.DateTime, nullable=False),
    sa.Column("last_seen_at", sa.DateTime, nullable=True),
    sa.Column("revoked_at", sa.DateTime, nullable=True),
)

login_tokens = sa.Table(
    "login_tokens",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("expires_at", sa.DateTime, nullable=False),
    sa.Column("used_at", sa.DateTime, nullable=True),
)

api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.String(24), primary_key=True),  # public id shown in `token list`
    sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("prefix", sa.String(16), nullable=False, index=True),  # lookup without scanning every hash
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("cmds", sa.JSON, nullable=True),  # allowed first words, or NULL for all
    sa.Column("vm_id", sa.String(32), sa.ForeignKey("vms.id", ondelete="CASCADE"), nullable=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("expires_at", sa.DateTime, nullable=True),
    sa.Column("last_used_at", sa.DateTime, nullable=True),
    sa.Column("revoked_at", sa.DateTime, nullable=True),
)

custom_domains = sa.Table(
    "custom_domains",
    metadata,
    # Several VMs may claim a domain while pending; the first to verify gets it (one verified row per domain).
    sa.Column("domain", sa.String(253), primary_key=True),
    sa.Column("vm_id", sa.String(32), sa.ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True, index=True),
    sa.Column("verify_token", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("verified_at", sa.DateTime, nullable=True),
    sa.Index("uq_custom_domains_verified", "domain", unique=True,
             sqlite_where=sa.text("verified_at IS NOT NULL"), postgresql_where=sa.text("verified_at IS NOT NULL")),
)

# --- Mail (migration 0005) ----------------------------------------------------------------------------------------

vm_mail = sa.Table(
    "vm_mail",
    metadata,
    # One row per VM that ever turned receiving on; no row = off.
    sa.Column("vm_id", sa.String(32), sa.ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("receive", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("notice", sa.String(200), nullable=True),  # why receiving switched itself off (shown by ls -l)
    sa.Column("updated_at", sa.DateTime, nullable=False),
)

email_codes = sa.Table(
    "email_codes",
    metadata,
    # A pending address change: the code is stored hashed; users.email holds verified addresses only.
    sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("address", sa.String(254), nullable=False),
    sa.Column("code_hash", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("expires_at", sa.DateTime, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
)

# --- LLM gateway (migration 0007) -----------------------------------------------------------------------------------

llm_keys = sa.Table(
    "llm_keys",
    metadata,
    # A user's own key for a provider, encrypted (AES-GCM, the server's data key; associated data user:provider).
    sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("provider", sa.String(32), primary_key=True),
    sa.Column("sealed", sa.LargeBinary, nullable=False),  # nonce (12 bytes) + ciphertext
    sa.Column("hint", sa.String(8), nullable=False),  # the last four characters, for `llm-key list`
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("last_used_at", sa.DateTime, nullable=True),
)

llm_usage = sa.Table(
    "llm_usage",
    metadata,
    # Tokens as the upstream reported them, per user, UTC day and provider.
    sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("provider", sa.String(32), primary_key=True),
    sa.Column("input_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("output_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("requests", sa.Integer, nullable=False, server_default="0"),
    sa.Index("ix_llm_usage_day", "day"),
)

# --- Agents started by `new --prompt` (migration 0008) -----------------------------------------------------------

vm_agents = sa.Table(
    "vm_agents",
    metadata,
    sa.Column("vm_id", sa.String(32), sa.ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("name", sa.String(16), nullable=False),  # pi, opencode
    sa.Column("state", sa.String(16), nullable=False),  # running, done, failed
    sa.Column("updated_at", sa.DateTime, nullable=False),
)

vm_setups = sa.Table(
    "vm_setups",
    metadata,
    # A template's setup.sh, run once after the first boot (migration 0009).
    sa.Column("vm_id", sa.String(32), sa.ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("template", sa.String(32), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # running, done, failed
    sa.Column("updated_at", sa.DateTime, nullable=False),
)

tutorial_lessons = sa.Table(
    "tutorial_lessons",
    metadata,
    # A lesson of the tutorial a user finished (its check passed) or skipped (migration 0010).
    sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("lesson", sa.Integer, primary_key=True),
    sa.Column("outcome", sa.String(8), nullable=False),  # done, skipped
    sa.Column("at", sa.DateTime, nullable=False),
)

# --- Arena (migration 0011) ----------------------------------------------------------------------------------------

arena_matches = sa.Table(
    "arena_matches",
    metadata,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("scenario", sa.String(32), nullable=False),
    sa.Column("creator_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("seats", sa.Integer, nullable=False),
    # open -> running -> scoring -> done | no_contest (also: cancelled, when everyone left before it started)
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("started_at", sa.DateTime, nullable=True),
    sa.Column("deadline", sa.DateTime, nullable=True),
    sa.Column("ended_at", sa.DateTime, nullable=True),
    sa.Column("note", sa.String(300), nullable=False, server_default=""),
)

arena_players = sa.Table(
    "arena_players",
    metadata,
    sa.Column("match_id", sa.String(16), sa.ForeignKey("arena_matches.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("joined_at", sa.DateTime, nullable=False),
    sa.Column("submitted_at", sa.DateTime, nullable=True),
    sa.Column("score", sa.Float, nullable=True),
    sa.Column("rating_before", sa.Float, nullable=True),
    sa.Column("rating_after", sa.Float, nullable=True),
)

arena_ratings = sa.Table(
    "arena_ratings",
    metadata,
    sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("rating", sa.Float, nullable=False),
    sa.Column("matches", sa.Integer, nullable=False, server_default="0"),
)
