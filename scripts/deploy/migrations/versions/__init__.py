"""The feedback store's schema revisions, applied in order by scripts/deploy/store.py:migrate (Alembic)."""
