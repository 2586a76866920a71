"""The ledger at scale: the transaction-history query and the worker's batch insert, measured on
a small ledger and again on a large one (10M rows by default) in the same run, with the plans.

    python -m credit_engine.loadtest.ledger_scale [--rows 10000000] [--orgs 100000] [--database-url URL] [--out docs]

Without --database-url it starts an embedded Postgres of its own in a temporary directory (the
data is thrown away). The rows are made in bulk by SQL with the ledger's triggers off for that
session only (they are consistent by construction: each org's chain is a top-up then unit
debits); the measured inserts go through the worker's own write_batch, triggers on.
"""

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from credit_engine.engine.config import Settings
from credit_engine.engine.db import asyncpg_dsn, with_database
from credit_engine.engine.embedded import EmbeddedPostgres, scratch_dir
from credit_engine.engine.ledger import LedgerEntry, write_batch
from credit_engine.engine.migrate import upgrade_to_head
from credit_engine.engine.types import EntryKind

HISTORY_SQL = """
SELECT id, kind, amount_pence, debt_delta_pence, balance_after_pence, call_id, idempotency_key, created_at
FROM ledger_entries
WHERE org_id = $1 AND ($2::bigint IS NULL OR id < $2)
ORDER BY id DESC LIMIT $3
"""  # the query of GET /api/wallet/transactions (webapp/wallet.py)
CHAIN_SQL = (
    "SELECT balance_after_pence, debt_after_pence FROM ledger_entries WHERE org_id = $1 ORDER BY id DESC LIMIT 1"
)
BATCH = 2_000
SEED_CHUNK_ROWS = 1_000_000


@dataclass
class Figures:
    rows: int
    history_first_p50_ms: float
    history_first_p99_ms: float
    history_deep_p50_ms: float
    batch_entries_per_s: float
    batch_ms: float


async def seed(conn: asyncpg.Connection, first_org: int, orgs: int, per_org: int, progress: str) -> None:
    """orgs × per_org rows: each org a top-up of 1,000,000p, then unit debits."""
    await conn.execute("SET session_replication_role = replica")  # this session only: no triggers
    await conn.execute(
        """INSERT INTO orgs (org_id, name, rate_pence_per_minute)
           SELECT 'o' || g, 'o' || g, 60 FROM generate_series($1::int, $2::int) g""",
        first_org,
        first_org + orgs - 1,
    )
    chunk_orgs = max(1, SEED_CHUNK_ROWS // per_org)
    for start in range(first_org, first_org + orgs, chunk_orgs):
        end = min(start + chunk_orgs, first_org + orgs) - 1
        await conn.execute(
            """INSERT INTO ledger_entries (org_id, idempotency_key, kind, amount_pence, balance_after_pence,
                   debt_after_pence, source, created_at)
               SELECT 'o' || g, 'o' || g || '/seed/' || k,
                      CASE WHEN k = 1 THEN 'topup' ELSE 'asset' END,
                      CASE WHEN k = 1 THEN 1000000 ELSE -1 END,
                      1000000 - (k - 1), 0,
                      CASE WHEN k = 1 THEN 'postgres' ELSE 'redis' END,
                      now() - make_interval(secs => ($3::int - k))
               FROM generate_series($1::int, $2::int) g, generate_series(1, $3::int) k
               ORDER BY k, g""",
            start,
            end,
            per_org,
        )
        print(f"  {progress}: orgs up to {end:,}", flush=True)
    await conn.execute(
        """INSERT INTO org_balances (org_id, balance_pence, debt_pence, entry_count, last_entry_id)
           SELECT org_id, (array_agg(balance_after_pence ORDER BY id DESC))[1], 0, count(*), max(id)
           FROM ledger_entries WHERE org_id IN (SELECT 'o' || g FROM generate_series($1::int, $2::int) g)
           GROUP BY org_id""",
        first_org,
        first_org + orgs - 1,
    )
    await conn.execute("SET session_replication_role = origin")
    await conn.execute("VACUUM ANALYZE ledger_entries")
    await conn.execute("VACUUM ANALYZE org_balances")


async def measure(conn: asyncpg.Connection, orgs: int, first_org: int, rows: int, rng: random.Random) -> Figures:
    firsts, deeps = [], []
    for _ in range(300):
        org = f"o{rng.randrange(first_org, first_org + orgs)}"
        started = time.perf_counter()
        page = await conn.fetch(HISTORY_SQL, org, None, 51)
        firsts.append((time.perf_counter() - started) * 1000)
        cursor = page[len(page) // 2]["id"] if page else None
        started = time.perf_counter()
        await conn.fetch(HISTORY_SQL, org, cursor, 51)
        deeps.append((time.perf_counter() - started) * 1000)
    batch_times = []
    balances: dict[str, int] = {}
    for round_ in range(5):
        chosen = [f"o{rng.randrange(first_org, first_org + orgs)}" for _ in range(200)]
        current = {
            r["org_id"]: r["balance_pence"]
            for r in await conn.fetch("SELECT org_id, balance_pence FROM org_balances WHERE org_id = ANY($1)", chosen)
        }
        balances.update(current)
        entries = []
        for i in range(BATCH):
            org = chosen[i % len(chosen)]
            balances[org] -= 1
            entries.append(
                LedgerEntry(
                    stream_id=f"{round_}-{i}",
                    org_id=org,
                    idempotency_key=f"{org}/bench/{rows}/{round_}/{i}",
                    kind=EntryKind.asset,
                    amount_pence=-1,
                    debt_delta_pence=0,
                    redis_balance_after_pence=balances[org],
                    redis_debt_after_pence=0,
                    call_id=None,
                    billed_seconds=0,
                    rate_pence_per_minute=0,
                    fingerprint="",
                    meta={},
                    created_ms=int(time.time() * 1000),
                    seq=0,
                )
            )
        started = time.perf_counter()
        await write_batch(conn, entries, [])
        batch_times.append(time.perf_counter() - started)
    batch_s = statistics.median(batch_times)
    firsts.sort()
    return Figures(
        rows,
        statistics.median(firsts),
        firsts[int(len(firsts) * 0.99) - 1],
        statistics.median(deeps),
        BATCH / batch_s,
        batch_s * 1000,
    )


async def explain(conn: asyncpg.Connection, org: str) -> tuple[str, str]:
    page = await conn.fetch(HISTORY_SQL, org, None, 51)
    history = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, TIMING OFF) " + HISTORY_SQL, org, page[25]["id"], 51)
    chain = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, TIMING OFF) " + CHAIN_SQL, org)
    return "\n".join(r[0] for r in history), "\n".join(r[0] for r in chain)


async def run(database_url: str, rows: int, orgs: int, out: Path | None) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    rng = random.Random(2026)
    per_org = rows // orgs
    small_orgs = max(1, 10_000 // per_org)
    try:
        print(f"seeding a small ledger: {small_orgs * per_org:,} rows", flush=True)
        await seed(conn, 1, small_orgs, per_org, "small")
        small = await measure(conn, small_orgs, 1, small_orgs * per_org, rng)
        print(f"seeding the large ledger: {rows:,} rows in {orgs:,} orgs", flush=True)
        started = time.monotonic()
        await seed(conn, small_orgs + 1, orgs - small_orgs, per_org, "large")
        seeded_s = time.monotonic() - started
        total = await conn.fetchval("SELECT count(*) FROM ledger_entries")
        size = await conn.fetchval("SELECT pg_size_pretty(pg_total_relation_size('ledger_entries'))")
        large = await measure(conn, orgs, 1, total, rng)
        history_plan, chain_plan = await explain(conn, f"o{orgs // 2}")
    finally:
        await conn.close()
    table = [
        "| ledger rows | history, first page p50 / p99 | history, from a cursor p50 | worker batch of 2,000 | entries/s |",
        "|---|---|---|---|---|",
    ]
    for f in (small, large):
        table.append(
            f"| {f.rows:,} | {f.history_first_p50_ms:.2f} / {f.history_first_p99_ms:.2f} ms | "
            f"{f.history_deep_p50_ms:.2f} ms | {f.batch_ms:.0f} ms | {f.batch_entries_per_s:,.0f} |"
        )
    ratio = (
        f"large / small: history {large.history_first_p50_ms / small.history_first_p50_ms:.2f}×, "
        f"batch insert {large.batch_ms / small.batch_ms:.2f}× the time"
    )
    report = "\n".join(table) + f"\n\n{ratio}. Seeding took {seeded_s:.0f} s; the table and its indexes: {size}.\n"
    print(report)
    print(history_plan)
    print(chain_plan)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "ledger-scale.md").write_text(
            "# The ledger at scale\n\nMeasured by `python -m credit_engine.loadtest.ledger_scale "
            f"--rows {rows} --orgs {orgs}` (embedded Postgres, this 2-core machine, "
            f"{time.strftime('%Y-%m-%d')}); both rows of the table come from the same run.\n\n"
            + report
            + "\n## Plans on the large ledger\n\nThe history query (`GET /api/wallet/transactions`, a page from a cursor):\n\n"
            + "```\n"
            + history_plan
            + "\n```\n\nThe chain check the ledger's trigger runs for every inserted row:\n\n"
            + "```\n"
            + chain_plan
            + "\n```\n"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--orgs", type=int, default=100_000)
    parser.add_argument(
        "--database-url", help="an admin URL; a database ce_ledger_scale is created (default: embedded Postgres)"
    )
    parser.add_argument("--out", type=Path, help="write ledger-scale.md here")
    args = parser.parse_args()
    with scratch_dir("ledger-scale-") as tmp:
        server = None
        admin_url = args.database_url
        if admin_url is None:
            server = EmbeddedPostgres(tmp / "postgres", user=Settings.from_env().pg_user)
            admin_url = server.start()
        try:
            asyncio.run(_create(admin_url))
            database_url = with_database(admin_url, "ce_ledger_scale")
            upgrade_to_head(database_url)
            asyncio.run(run(database_url, args.rows, args.orgs, args.out))
        finally:
            asyncio.run(_drop(admin_url))
            if server is not None:
                server.stop()


async def _create(admin_url: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(admin_url))
    try:
        await conn.execute('DROP DATABASE IF EXISTS "ce_ledger_scale"')
        await conn.execute('CREATE DATABASE "ce_ledger_scale"')
    finally:
        await conn.close()


async def _drop(admin_url: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(admin_url))
    try:
        await conn.execute('DROP DATABASE IF EXISTS "ce_ledger_scale" WITH (FORCE)')
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
