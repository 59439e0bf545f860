"""data mover manifest: UID caches, mailbox key, run figures

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-28 06:00:00

Why: the manifest keys on content (folder + sha256); UIDs are only a cache valid under one
UIDVALIDITY, on each side. `mailbox` names the copy job (a migration's address, or the
user of a stand-alone `mover copy`), `phase` tells prestage, copy and final delta apart,
and the source totals of a run let `--plan` estimate how long a window's transfers take.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('transfer_manifest', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mailbox', sa.String(length=320), nullable=True))
        batch_op.add_column(sa.Column('src_validity', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('src_uid', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('dst_folder', sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column('dst_validity', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('dst_uid', sa.String(length=255), nullable=True))
        batch_op.create_index('ix_manifest_mailbox_folder', ['mailbox', 'folder'], unique=False)
    with op.batch_alter_table('transfer_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mailbox', sa.String(length=320), nullable=True))
        batch_op.add_column(sa.Column('phase', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('messages_total', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('bytes_total', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('missing', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('report', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('transfer_runs', schema=None) as batch_op:
        for name in ('report', 'missing', 'bytes_total', 'messages_total', 'phase', 'mailbox'):
            batch_op.drop_column(name)
    with op.batch_alter_table('transfer_manifest', schema=None) as batch_op:
        batch_op.drop_index('ix_manifest_mailbox_folder')
        for name in ('dst_uid', 'dst_validity', 'dst_folder', 'src_uid', 'src_validity',
                     'mailbox'):
            batch_op.drop_column(name)
