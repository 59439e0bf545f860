"""data mover proof from the target's own bytes

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 08:00:00

Why: a copy is proven only by the hash of the bytes the target returns for its UID (read
back once after the APPEND), never by a size (issue 21: Cyrus rewrote 8-bit header bytes
keeping the length, and 165 altered copies counted as proven). `dst_sha256` is that hash,
`proof` what it showed (identical, equivalent:REWRITE under an accepted equivalence, or
altered:KIND), `proof_note` an example of an alteration. Rows written before this revision
have no read-back hash: their target messages are fetched and hashed once more.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('transfer_manifest', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dst_sha256', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('proof', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('proof_note', sa.String(length=512), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('transfer_manifest', schema=None) as batch_op:
        for name in ('proof_note', 'proof', 'dst_sha256'):
            batch_op.drop_column(name)
