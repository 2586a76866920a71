"""credit-engine: a real-time prepaid credit engine for voice-AI platforms that resell Vapi.

The one import name the wheel installs. This folder (`cli/` in the repository) is the package's
root and holds the command line, the one module allowed to start every app; the repository's other
folders are its subpackages, mapped in pyproject.toml:

  credit_engine.engine      the money decisions, the ledger, the reconciler (imports nothing above it)
  credit_engine.lua         the Redis scripts that make every balance decision
  credit_engine.webapp      the HTTP apps (Vapi's webhook, the org and admin APIs)
  credit_engine.worker      the arq worker (ledger writer, kill switch, expiry, alerts)
  credit_engine.migrations  Alembic migrations and the ledger's SQL
  credit_engine.loadtest    benchmarks and load runs (on top of everything)

`python -m credit_engine` is the `credit-engine` command.
"""
