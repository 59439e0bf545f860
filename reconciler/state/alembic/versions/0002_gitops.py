"""gitops: leases, placement suspensions, wave reports

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 10:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('leases',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('holder', sa.String(length=255), nullable=False),
    sa.Column('acquired_at', sa.DateTime(), nullable=False),
    sa.Column('renewed_at', sa.DateTime(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('placement_suspensions',
    sa.Column('placement', sa.String(length=128), nullable=False),
    sa.Column('since', sa.DateTime(), nullable=False),
    sa.Column('by', sa.String(length=255), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('placement')
    )
    op.create_table('wave_reports',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('placement', sa.String(length=128), nullable=False),
    sa.Column('last_migration_id', sa.Integer(), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('mailed_to', sa.Text(), nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('wave_reports', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_wave_reports_placement'), ['placement'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('wave_reports', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_wave_reports_placement'))
    op.drop_table('wave_reports')
    op.drop_table('placement_suspensions')
    op.drop_table('leases')
