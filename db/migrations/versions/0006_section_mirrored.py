"""slide_czi_to_tif.mirrored: a section the user says is mounted face down (align mirrors it).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

Additive: one boolean column, false for every existing row (nothing changes until a user sets it).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("slide_czi_to_tif") as batch:
        batch.add_column(sa.Column("mirrored", sa.Boolean(), nullable=False, server_default=sa.text("0")))


def downgrade() -> None:
    with op.batch_alter_table("slide_czi_to_tif") as batch:
        batch.drop_column("mirrored")
