"""Operating an instance: suspension and per-user quota overrides on ``users``; audit log indexes for the panel.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("suspended_at", sa.DateTime, nullable=True))
        batch.add_column(sa.Column("suspend_reason", sa.String(200), nullable=False, server_default=""))
        batch.add_column(sa.Column("quota", sa.JSON, nullable=True))
    op.create_index("ix_audit_log_action_id", "audit_log", ["action", "id"])
    op.create_index("ix_audit_log_target_id", "audit_log", ["target", "id"])
    op.create_index("ix_vms_status_runtime", "vms", ["status", "runtime"])


def downgrade() -> None:
    op.drop_index("ix_vms_status_runtime", "vms")
    op.drop_index("ix_audit_log_target_id", "audit_log")
    op.drop_index("ix_audit_log_action_id", "audit_log")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("quota")
        batch.drop_column("suspend_reason")
        batch.drop_column("suspended_at")
