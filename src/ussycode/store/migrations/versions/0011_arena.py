"""Arena: matches, their players (scores, ratings before and after) and players' ratings.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "arena_matches",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("scenario", sa.String(32), nullable=False),
        sa.Column("creator_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("seats", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=True),
        sa.Column("deadline", sa.DateTime, nullable=True),
        sa.Column("ended_at", sa.DateTime, nullable=True),
        sa.Column("note", sa.String(300), nullable=False, server_default=""),
    )
    op.create_index("ix_arena_matches_state", "arena_matches", ["state"])
    op.create_table(
        "arena_players",
        sa.Column("match_id", sa.String(16), sa.ForeignKey("arena_matches.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("joined_at", sa.DateTime, nullable=False),
        sa.Column("submitted_at", sa.DateTime, nullable=True),
        sa.Column("score", sa.Float, nullable=True),
        sa.Column("rating_before", sa.Float, nullable=True),
        sa.Column("rating_after", sa.Float, nullable=True),
    )
    op.create_table(
        "arena_ratings",
        sa.Column("user_id", sa.String(32), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("rating", sa.Float, nullable=False),
        sa.Column("matches", sa.Integer, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("arena_ratings")
    op.drop_table("arena_players")
    op.drop_index("ix_arena_matches_state", "arena_matches")
    op.drop_table("arena_matches")
