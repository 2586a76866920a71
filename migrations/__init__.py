"""Alembic migrations. Run with `credit-engine migrate` (engine/migrate.py)."""
