"""The database schema as the migrations leave it, described in plain data so that a deployment's
schema can be compared with what this release expects (`credit-engine verify`).

The expected description ships as migrations/schema.json. A test migrates a fresh database and
compares, so the file cannot drift from the migrations; regenerate it with
`python -m credit_engine.engine.schema <database_url> > migrations/schema.json` after adding a migration.
"""

import asyncio
import json
import sys
from importlib import resources
from typing import Any

import asyncpg

from credit_engine.engine.db import asyncpg_dsn

Schema = dict[str, Any]
CONSTRAINT_KINDS = {"p": "primary key", "u": "unique", "f": "foreign key", "c": "check", "x": "exclusion"}


async def describe(conn: asyncpg.Connection) -> Schema:
    """Tables with their columns, constraints and indexes, in the public schema; and the migration."""
    tables: dict[str, Any] = {}
    for row in await conn.fetch(
        """SELECT c.relname AS table_name, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition ORDER BY 1"""
    ):
        tables[row["table_name"]] = {"columns": {}, "constraints": {}, "indexes": []}
    for row in await conn.fetch(
        """SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns
           WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"""
    ):
        if row["table_name"] in tables:
            tables[row["table_name"]]["columns"][row["column_name"]] = (
                f"{row['data_type']}{'' if row['is_nullable'] == 'YES' else ' not null'}"
            )
    for row in await conn.fetch(
        """SELECT rel.relname AS table_name, con.conname, con.contype FROM pg_constraint con
           JOIN pg_class rel ON rel.oid = con.conrelid JOIN pg_namespace n ON n.oid = rel.relnamespace
           WHERE n.nspname = 'public' ORDER BY 1, 2"""
    ):
        if row["table_name"] in tables:
            kind = row["contype"].decode() if isinstance(row["contype"], bytes) else str(row["contype"])  # a "char"
            tables[row["table_name"]]["constraints"][row["conname"]] = CONSTRAINT_KINDS.get(kind, kind)
    for row in await conn.fetch(
        "SELECT tablename, indexname FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1, 2"
    ):
        if row["tablename"] in tables:
            tables[row["tablename"]]["indexes"].append(row["indexname"])
    revision = None
    if "alembic_version" in tables:
        revision = await conn.fetchval("SELECT version_num FROM alembic_version")
    return {"revision": revision, "tables": tables}


def expected() -> Schema:
    return json.loads(resources.files("credit_engine.migrations").joinpath("schema.json").read_text())  # type: ignore[no-any-return]


def differences(want: Schema, have: Schema) -> list[str]:
    """What `have` lacks or has different from `want` (extra tables or indexes are not a problem)."""
    problems = []
    if have.get("revision") != want.get("revision"):
        problems.append(
            f"migration {have.get('revision')!r}, expected {want.get('revision')!r} (run `credit-engine migrate`)"
        )
    for table, spec in want["tables"].items():
        got = have["tables"].get(table)
        if got is None:
            problems.append(f"table {table} missing")
            continue
        for column, kind in spec["columns"].items():
            if got["columns"].get(column) != kind:
                problems.append(f"{table}.{column}: {got['columns'].get(column) or 'missing'}, expected {kind}")
        for name, kind in spec["constraints"].items():
            if got["constraints"].get(name) != kind:
                problems.append(f"{table}: {kind} constraint {name} missing")
        for index in spec["indexes"]:
            if index not in got["indexes"]:
                problems.append(f"{table}: index {index} missing")
    return problems


async def _print(database_url: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        print(json.dumps(await describe(conn), indent=1, sort_keys=True))
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(_print(sys.argv[1]))
