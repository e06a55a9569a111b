"""LLM gateway: users' own provider keys (encrypted) and token usage per user, day and provider.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "llm_keys",
        sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("provider", sa.String(32), primary_key=True),
        sa.Column("sealed", sa.LargeBinary, nullable=False),
        sa.Column("hint", sa.String(8), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("last_used_at", sa.DateTime, nullable=True),
    )
    op.create_table(
        "llm_usage",
        sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("day", sa.Date, primary_key=True),
        sa.Column("provider", sa.String(32), primary_key=True),
        sa.Column("input_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("output_tokens", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("requests", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_index("ix_llm_usage_day", "llm_usage", ["day"])


def downgrade() -> None:
    op.drop_index("ix_llm_usage_day", "llm_usage")
    op.drop_table("llm_usage")
    op.drop_table("llm_keys")
