"""manual steps: migrations.manual_step, address_errors.manual_step

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 19:00:00

Why: a step mailferry cannot do itself (a hosted target's mailbox that only its provider's
admin can create) is a state of its own in the plan, with what the person must do; the
engine rechecks it and clears it when the step succeeds. A `create` (an address placed on
such a system from the start) has no migration row: its manual step is kept with its
back-off in address_errors.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('migrations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('manual_step', sa.Text(), nullable=True))
    with op.batch_alter_table('address_errors', schema=None) as batch_op:
        batch_op.add_column(sa.Column('manual_step', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('address_errors', schema=None) as batch_op:
        batch_op.drop_column('manual_step')
    with op.batch_alter_table('migrations', schema=None) as batch_op:
        batch_op.drop_column('manual_step')
