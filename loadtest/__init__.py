"""Load runs (locust) and benchmarks. See README and docs/benchmarks.md."""
