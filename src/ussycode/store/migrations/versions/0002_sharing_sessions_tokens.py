"""Sharing (public ports, user shares, links), browser sessions and login tokens, API tokens, custom domains.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vm_public_ports",
        sa.Column("vm_id", sa.String(32), sa.ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("port", sa.Integer, primary_key=True),
    )
    op.create_table(
        "vm_shares",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("vm_id", sa.String(32), sa.ForeignKey("vms.id", ondelete="CASCADE"), nullable=False),
        sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=True),
        sa.Column("email", sa.String(254), nullable=True),
        sa.Column("created_by", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("vm_id", "user_id", name="uq_vm_shares_user"),
        sa.UniqueConstraint("vm_id", "email", name="uq_vm_shares_email"),
    )
    op.create_index("ix_vm_shares_vm_id", "vm_shares", ["vm_id"])
    op.create_table(
        "share_links",
        sa.Column("token", sa.String(64), primary_key=True),
        sa.Column("vm_id", sa.String(32), sa.ForeignKey("vms.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_by", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=True),
        sa.Column("uses", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_index("ix_share_links_vm_id", "share_links", ["vm_id"])
    op.create_table(
        "web_sessions",
        sa.Column("id_hash", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("parent_hash", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
        sa.Column("last_seen_at", sa.DateTime, nullable=True),
        sa.Column("revoked_at", sa.DateTime, nullable=True),
    )
    op.create_index("ix_web_sessions_user_id", "web_sessions", ["user_id"])
    op.create_index("ix_web_sessions_parent_hash", "web_sessions", ["parent_hash"])
    op.create_table(
        "login_tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
        sa.Column("used_at", sa.DateTime, nullable=True),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(24), primary_key=True),
        sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("cmds", sa.JSON, nullable=True),
        sa.Column("vm_id", sa.String(32), sa.ForeignKey("vms.id", ondelete="CASCADE"), nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=True),
        sa.Column("last_used_at", sa.DateTime, nullable=True),
        sa.Column("revoked_at", sa.DateTime, nullable=True),
    )
    op.create_index("ix_api_tokens_user_id", "api_tokens", ["user_id"])
    op.create_index("ix_api_tokens_prefix", "api_tokens", ["prefix"])
    op.create_table(
        "custom_domains",
        sa.Column("domain", sa.String(253), primary_key=True),
        sa.Column("vm_id", sa.String(32), sa.ForeignKey("vms.id", ondelete="CASCADE"), nullable=False),
        sa.Column("verify_token", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("verified_at", sa.DateTime, nullable=True),
    )
    op.create_index("ix_custom_domains_vm_id", "custom_domains", ["vm_id"])


def downgrade() -> None:
    for table in ("custom_domains", "api_tokens", "login_tokens", "web_sessions", "share_links", "vm_shares",
                  "vm_public_ports"):
        op.drop_table(table)
