"""stage_lock: one runner per animal, stage, channel and resolution.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06

Additive: one new table. Its primary key is the lock: a runner INSERTs its row, and a second
runner's INSERT of the same key fails on SQLite and MySQL alike (`db.locks`).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TABLE = "stage_lock"
TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("FK_prep_id", sa.String(20), nullable=False),
        sa.Column("stage", sa.String(40), nullable=False),
        sa.Column("channel", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("resolution", sa.String(10), nullable=False),
        sa.Column("token", sa.String(32), nullable=False),
        sa.Column("FK_pipeline_run_id", sa.Integer(), nullable=True),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("acquired", TIMESTAMP, nullable=False),
        sa.Column("heartbeat", TIMESTAMP, nullable=False),
        sa.Column("lease_seconds", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("FK_prep_id", "stage", "channel", "resolution", name=op.f("pk_stage_lock")),
    )


def downgrade() -> None:
    op.drop_table(TABLE)
