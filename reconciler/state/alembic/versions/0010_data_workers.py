"""workers: data_workers (the `reconcile worker` processes, by name, and when each was
last seen)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 22:00:00

Why: the status page and `reconcile status` show which worker runs each data job and
whether it is still alive. `data_jobs.worker` names the worker (HOST:PID), but
procrastinate's `procrastinate_workers` rows are anonymous (an id and a heartbeat) and are
deleted when a stalled worker is pruned; so each worker keeps a named row here with its
lease settings, refreshed every heartbeat, and deletes it when it stops.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('data_workers',
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('concurrency', sa.Integer(), nullable=False),
    sa.Column('heartbeat', sa.Float(), nullable=False),
    sa.Column('stalled', sa.Float(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('last_seen', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )


def downgrade() -> None:
    op.drop_table('data_workers')
