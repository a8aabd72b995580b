"""work claims: which process analyses a case or sends a message, and until when

Several daemon processes may share one PostgreSQL database; each claims a queued case or an
outgoing message for a lease, so that no two work on the same one and a killed process's work
is taken over once its lease has run out.

Revision ID: 0005_i10
Revises: 0004_i11
Create Date: 2026-11-30 08:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_i10"
down_revision: str | None = "0004_i11"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("cases", "outbox")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("claimed_by", sa.String(64), nullable=True))
            batch.add_column(sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("claimed_until")
            batch.drop_column("claimed_by")
