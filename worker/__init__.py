"""The arq worker: drains the outbox into the Postgres ledger, expires stale holds, finishes credits."""
