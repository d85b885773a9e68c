"""Alembic's environment for the feedback store: run by scripts/deploy/store.py:migrate on the recorder's connection.

PostgreSQL: a transaction-level advisory lock, so several recorders starting at once (several hosts) migrate one at a
time (the others then find the schema at head). SQLite: batch mode, for the ALTERs SQLite cannot do in place.
"""

from alembic import context

from scripts.deploy.store import METADATA

LOCK_ID = 2_023_000_023  # any constant the recorders agree on

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=METADATA,
                  render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({LOCK_ID})")
    context.run_migrations()
