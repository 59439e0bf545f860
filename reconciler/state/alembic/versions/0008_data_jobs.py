"""workers: data_jobs (data steps handed to `reconcile worker` processes), system_pace
(a system's pace and back-off shared by every worker)

Revision ID: 0008
Revises: 0006
Create Date: 2026-12-04 19:00:00

Why: with workers, the reconciler queues a data step (a copy, a verification) and a worker
on another host runs it; the result must reach the reconciler through the store it already
shares, and the limits of a system (its throttle, its back-off after a throttling answer)
must hold for all workers together, so they live in the store too.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('data_jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('migration_id', sa.Integer(), nullable=False),
    sa.Column('step', sa.String(length=16), nullable=False),
    sa.Column('state', sa.Integer(), nullable=False),
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('job_id', sa.BigInteger(), nullable=True),
    sa.Column('worker', sa.String(length=255), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('enqueued_at', sa.DateTime(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ux_data_jobs_step', 'data_jobs', ['migration_id', 'step', 'state'],
                    unique=True)
    op.create_table('system_pace',
    sa.Column('system', sa.String(length=128), nullable=False),
    sa.Column('tat', sa.DateTime(), nullable=False),
    sa.Column('strikes', sa.Integer(), nullable=False),
    sa.Column('struck_at', sa.DateTime(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('system')
    )


def downgrade() -> None:
    op.drop_table('system_pace')
    op.drop_index('ux_data_jobs_step', table_name='data_jobs')
    op.drop_table('data_jobs')
