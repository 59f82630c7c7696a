"""slide_czi_to_tif: time points of a scene and the one extracted.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

Additive: two integer columns with server defaults, so existing rows read as what they are (one
time point, the first one extracted). Batch mode keeps SQLite's ALTER limits out of the way.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLE = "slide_czi_to_tif"


def upgrade() -> None:
    with op.batch_alter_table(TABLE) as batch:
        batch.add_column(sa.Column("time_points", sa.Integer(), server_default=sa.text("1"), nullable=False))
        batch.add_column(sa.Column("time_point", sa.Integer(), server_default=sa.text("0"), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table(TABLE) as batch:
        batch.drop_column("time_point")
        batch.drop_column("time_points")
