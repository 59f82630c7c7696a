"""alignment_metric: similarity of consecutive aligned sections (create_metrics).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24

Additive: one new table, nothing else changes. Types are spelled out (not imported from the
models) so this revision keeps creating the same table when the models change later.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TABLE = "alignment_metric"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("FK_prep_id", sa.String(20), nullable=False),
        sa.Column("FK_section_id", sa.Integer(), nullable=False),
        sa.Column("FK_fixed_section_id", sa.Integer(), nullable=True),
        sa.Column("section", sa.String(5), nullable=False),
        sa.Column("channel", sa.Integer(), nullable=False),
        sa.Column("resolution", sa.String(10), nullable=False),
        sa.Column("ncc", sa.Float(), nullable=True),
        sa.Column("mutual_information", sa.Float(), nullable=True),
        sa.Column("overlap_fraction", sa.Float(), nullable=True),
        sa.Column("FK_pipeline_run_id", sa.Integer(), nullable=True),
        sa.Column("created", sa.DateTime(), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(["FK_prep_id"], ["animal.prep_id"], name=op.f("fk_alignment_metric_FK_prep_id_animal")),
        sa.ForeignKeyConstraint(
            ["FK_section_id"], ["slide_czi_to_tif.id"], name=op.f("fk_alignment_metric_FK_section_id_slide_czi_to_tif")
        ),
        sa.ForeignKeyConstraint(
            ["FK_fixed_section_id"], ["slide_czi_to_tif.id"],
            name=op.f("fk_alignment_metric_FK_fixed_section_id_slide_czi_to_tif"),
        ),
        sa.ForeignKeyConstraint(
            ["FK_pipeline_run_id"], ["pipeline_run.id"], name=op.f("fk_alignment_metric_FK_pipeline_run_id_pipeline_run")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alignment_metric")),
    )
    for column in ("FK_prep_id", "FK_section_id", "FK_fixed_section_id", "FK_pipeline_run_id"):
        op.create_index(op.f(f"ix_{TABLE}_{column}"), TABLE, [column])


def downgrade() -> None:
    op.drop_table(TABLE)
