"""case summary: what lists show (counts, flags, STAT) kept apart from the cell details

Revision ID: 0004_i11
Revises: 0003
Create Date: 2026-11-30 05:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from lisplugin.core.report import result_summary

revision: str = "0004_i11"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 200


def upgrade() -> None:
    with op.batch_alter_table("cases") as batch:
        batch.add_column(sa.Column("summary", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("stat", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.create_index("ix_cases_review_order", ["status", "stat", "analysed_at"])
    cases = sa.table(
        "cases",
        sa.column("id", sa.Integer),
        sa.column("result", sa.JSON),
        sa.column("order", sa.JSON),
        sa.column("summary", sa.JSON),
        sa.column("stat", sa.Boolean),
    )
    connection = op.get_bind()
    last = 0
    while True:  # in batches: a large site's results do not fit in memory at once
        rows = connection.execute(
            sa.select(cases.c.id, cases.c.result, cases.c.order)
            .where(cases.c.id > last)
            .order_by(cases.c.id)
            .limit(BATCH)
        ).all()
        if not rows:
            break
        for case_id, result, order in rows:
            connection.execute(
                cases.update()
                .where(cases.c.id == case_id)
                .values(
                    summary=result_summary(result),
                    stat=(order or {}).get("priority") == "S",
                )
            )
        last = rows[-1][0]


def downgrade() -> None:
    with op.batch_alter_table("cases") as batch:
        batch.drop_index("ix_cases_review_order")
        batch.drop_column("stat")
        batch.drop_column("summary")
