"""Alembic environment: runs on the connection that ``ExperienceStore.upgrade`` hands over.

Batch mode is on so ALTERs work on SQLite; the naming convention on ``Base.metadata`` keeps constraint names
identical on both backends.
"""

from __future__ import annotations

from alembic import context

from storage.schema import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
