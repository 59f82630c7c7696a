"""pipeline_run.summary: what a stage found, beyond counts (e.g. align's sections to look at).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

Additive: one nullable text column (JSON); runs recorded before it have none.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

LONG_TEXT = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    with op.batch_alter_table("pipeline_run") as batch:
        batch.add_column(sa.Column("summary", LONG_TEXT, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("pipeline_run") as batch:
        batch.drop_column("summary")
