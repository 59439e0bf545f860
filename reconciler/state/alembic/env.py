"""Alembic environment: runs on the connection `reconciler.state.store.upgrade` passes in."""

from __future__ import annotations

from alembic import context

from reconciler.state.model import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite needs batch ALTERs
)
with context.begin_transaction():
    context.run_migrations()
