"""Alembic migrations of the feedback store (scripts/deploy/store.py): env.py and the revisions, run by Alembic."""
