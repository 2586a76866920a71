"""credit-engine: prepaid credit decisions in Redis Lua, an append-only ledger in Postgres."""
