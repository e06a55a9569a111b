"""Mail: per-VM receiving switch (``vm_mail``) and pending e-mail address verifications (``email_codes``).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vm_mail",
        sa.Column("vm_id", sa.String(32), sa.ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("receive", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("notice", sa.String(200), nullable=True),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "email_codes",
        sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("address", sa.String(254), nullable=False),
        sa.Column("code_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("email_codes")
    op.drop_table("vm_mail")
