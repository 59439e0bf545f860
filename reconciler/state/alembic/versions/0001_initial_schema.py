"""initial schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-28 04:30:27.487786
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.Column('migration_id', sa.Integer(), nullable=True),
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('step', sa.String(length=16), nullable=False),
    sa.Column('from_state', sa.Integer(), nullable=True),
    sa.Column('to_state', sa.Integer(), nullable=True),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.Column('specs_commit', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_events_address'), ['address'], unique=False)
        batch_op.create_index(batch_op.f('ix_events_at'), ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_events_migration_id'), ['migration_id'], unique=False)

    op.create_table('migrations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('aliases', sa.JSON(), nullable=False),
    sa.Column('source_system', sa.String(length=64), nullable=False),
    sa.Column('target_system', sa.String(length=64), nullable=False),
    sa.Column('source_mailbox', sa.String(length=320), nullable=False),
    sa.Column('target_mailbox', sa.String(length=320), nullable=False),
    sa.Column('placement', sa.String(length=128), nullable=False),
    sa.Column('window', sa.String(length=128), nullable=True),
    sa.Column('modes', sa.JSON(), nullable=False),
    sa.Column('station', sa.String(length=128), nullable=True),
    sa.Column('state', sa.Integer(), nullable=False),
    sa.Column('state_since', sa.DateTime(), nullable=False),
    sa.Column('failed_reason', sa.Text(), nullable=True),
    sa.Column('failed_step', sa.String(length=16), nullable=True),
    sa.Column('address_migration_id', sa.String(length=64), nullable=True),
    sa.Column('hold_started_at', sa.DateTime(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('next_attempt_at', sa.DateTime(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('mailbox_type', sa.String(length=64), nullable=True),
    sa.Column('mailbox_size', sa.Integer(), nullable=True),
    sa.Column('station_action', sa.String(length=32), nullable=True),
    sa.Column('station_action_since', sa.DateTime(), nullable=True),
    sa.Column('suspended', sa.Boolean(), nullable=False),
    sa.Column('purged', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('migrations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_migrations_address'), ['address'], unique=False)

    op.create_table('station_reports',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('station', sa.String(length=128), nullable=False),
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('migration_id', sa.Integer(), nullable=True),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('ok', sa.Boolean(), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.Column('report_id', sa.String(length=64), nullable=True),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('report_id')
    )
    with op.batch_alter_table('station_reports', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_station_reports_address'), ['address'], unique=False)
        batch_op.create_index(batch_op.f('ix_station_reports_migration_id'), ['migration_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_station_reports_station'), ['station'], unique=False)

    op.create_table('stations',
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('address', sa.String(length=320), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('last_seen', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('name')
    )
    with op.batch_alter_table('stations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_stations_address'), ['address'], unique=False)

    op.create_table('transfer_manifest',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('migration_id', sa.Integer(), nullable=False),
    sa.Column('folder', sa.String(length=512), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('message_id', sa.String(length=998), nullable=True),
    sa.Column('copied', sa.Boolean(), nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('transfer_manifest', schema=None) as batch_op:
        batch_op.create_index('ix_manifest_migration_folder', ['migration_id', 'folder'], unique=False)

    op.create_table('transfer_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('migration_id', sa.Integer(), nullable=False),
    sa.Column('copied', sa.Integer(), nullable=False),
    sa.Column('present', sa.Integer(), nullable=False),
    sa.Column('failed', sa.Integer(), nullable=False),
    sa.Column('bytes_copied', sa.Integer(), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('verified', sa.Boolean(), nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('transfer_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_transfer_runs_migration_id'), ['migration_id'], unique=False)




def downgrade() -> None:

    with op.batch_alter_table('transfer_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_transfer_runs_migration_id'))

    op.drop_table('transfer_runs')
    with op.batch_alter_table('transfer_manifest', schema=None) as batch_op:
        batch_op.drop_index('ix_manifest_migration_folder')

    op.drop_table('transfer_manifest')
    with op.batch_alter_table('stations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_stations_address'))

    op.drop_table('stations')
    with op.batch_alter_table('station_reports', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_station_reports_station'))
        batch_op.drop_index(batch_op.f('ix_station_reports_migration_id'))
        batch_op.drop_index(batch_op.f('ix_station_reports_address'))

    op.drop_table('station_reports')
    with op.batch_alter_table('migrations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_migrations_address'))

    op.drop_table('migrations')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_events_migration_id'))
        batch_op.drop_index(batch_op.f('ix_events_at'))
        batch_op.drop_index(batch_op.f('ix_events_address'))

    op.drop_table('events')

