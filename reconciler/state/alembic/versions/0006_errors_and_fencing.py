"""engine error model and lease fencing: migrations.error_since, address_errors,
leases.generation

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 08:00:00

Why: a step's retry timeout counts from the first error of its current run
(`error_since`); a `create` or `E1` that fails has no migration row to keep its back-off
and failure in (`address_errors`); and the lease's `generation` is the fencing token fed
checks on every mutating call, so it must only ever grow.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('migrations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('error_since', sa.DateTime(), nullable=True))
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.add_column(sa.Column('generation', sa.BigInteger(), nullable=False,
                                      server_default='0'))
        batch_op.add_column(sa.Column('fence_id', sa.String(length=64), nullable=False,
                                      server_default=''))
    op.create_table('address_errors',
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('step', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('error_since', sa.DateTime(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=False),
    sa.Column('failed_reason', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('address')
    )


def downgrade() -> None:
    op.drop_table('address_errors')
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.drop_column('fence_id')
        batch_op.drop_column('generation')
    with op.batch_alter_table('migrations', schema=None) as batch_op:
        batch_op.drop_column('error_since')
