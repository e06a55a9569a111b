"""Agents working on a prompt given to `new --prompt`: which agent, and its state as the VM reports it.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vm_agents",
        sa.Column("vm_id", sa.String(32), sa.ForeignKey("vms.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("name", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("vm_agents")
