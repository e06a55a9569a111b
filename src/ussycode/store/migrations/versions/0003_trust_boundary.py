"""Share links hashed at rest with a short id and the port they open; VM-host sessions bound to the VM's id;
several pending custom-domain claims per domain (one verified).

Revision ID: 0003
Revises: 0002
"""

import hashlib
import secrets

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_ID_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"


def _link_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(10))


def upgrade() -> None:
    conn = op.get_bind()

    # share_links: the token itself is replaced by its hash; existing links open the main URL (port 8080).
    old = sa.table("share_links", sa.column("token", sa.String), sa.column("vm_id", sa.String),
                   sa.column("created_by", sa.String), sa.column("created_at", sa.DateTime),
                   sa.column("expires_at", sa.DateTime), sa.column("uses", sa.Integer))
    old_links = conn.execute(sa.select(old)).mappings().all()
    op.drop_table("share_links")
    links = op.create_table(
        "share_links",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("vm_id", sa.String(32), sa.ForeignKey("vms.id", ondelete="CASCADE"), nullable=False),
        sa.Column("port", sa.Integer, nullable=False, server_default="8080"),
        sa.Column("created_by", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=True),
        sa.Column("uses", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_index("ix_share_links_vm_id", "share_links", ["vm_id"])
    if old_links:
        op.bulk_insert(links, [
            {"id": _link_id(), "token_hash": hashlib.sha256(f"share-link:{r['token']}".encode()).hexdigest(),
             "vm_id": r["vm_id"], "port": 8080, "created_by": r["created_by"], "created_at": r["created_at"],
             "expires_at": r["expires_at"], "uses": r["uses"]}
            for r in old_links])

    # web_sessions: VM-host sessions name the VM they were made for. Existing VM-host sessions (no VM id) are
    # revoked: they would otherwise outlive a VM of the same name.
    with op.batch_alter_table("web_sessions") as batch:
        batch.add_column(sa.Column("vm_id", sa.String(32), nullable=True))
    conn.execute(sa.text("UPDATE web_sessions SET revoked_at = CURRENT_TIMESTAMP "
                         "WHERE parent_hash IS NOT NULL AND revoked_at IS NULL"))

    # custom_domains: primary key (domain, vm_id); at most one verified row per domain.
    old_cd = sa.table("custom_domains", sa.column("domain", sa.String), sa.column("vm_id", sa.String),
                      sa.column("verify_token", sa.String), sa.column("created_at", sa.DateTime),
                      sa.column("verified_at", sa.DateTime))
    old_domains = conn.execute(sa.select(old_cd)).mappings().all()
    op.drop_table("custom_domains")
    domains = op.create_table(
        "custom_domains",
        sa.Column("domain", sa.String(253), primary_key=True),
        sa.Column("vm_id", sa.String(32), sa.ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("verify_token", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("verified_at", sa.DateTime, nullable=True),
    )
    op.create_index("ix_custom_domains_vm_id", "custom_domains", ["vm_id"])
    op.create_index("uq_custom_domains_verified", "custom_domains", ["domain"], unique=True,
                    sqlite_where=sa.text("verified_at IS NOT NULL"),
                    postgresql_where=sa.text("verified_at IS NOT NULL"))
    if old_domains:
        op.bulk_insert(domains, [dict(r) for r in old_domains])


def downgrade() -> None:
    raise NotImplementedError("0003 hashes share-link tokens; it cannot be undone (restore the pre-upgrade backup)")
