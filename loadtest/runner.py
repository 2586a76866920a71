"""`credit-engine loadtest <scenario>`: the seed's load scenarios over HTTP with locust, then a check
that Redis and the Postgres ledger agree. Prints PASS or FAIL with the counts; exits 1 on FAIL.

  provision-race           100 provisions at once against a balance that funds exactly one
  assistant-request-race   50 identical assistant-requests for one call at once
  mixed-race               25 provisions + 25 assistant-requests at once; 2 of them fit
  mixed                    many orgs: calls (start, status checks, end), top-ups, provisions, for
                           --run-time; then a reconcile check that must find no drift
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from credit_engine.engine import processes
from credit_engine.loadtest.stack import Stack

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
PRICE_PENCE = 1000
drain_timeout_s = 60.0


@dataclass
class Org:
    org_id: str
    api_key: str
    number_id: str


def make_org(client: httpx.Client, stack: Stack, org_id: str, balance_pence: int, **settings: Any) -> Org:
    admin = stack.admin()
    body = {"org_id": org_id, "name": org_id, "rate_pence_per_minute": 60, **settings}
    client.post("/api/admin/orgs", json=body, headers=admin).raise_for_status()
    api_key = client.post(f"/api/admin/orgs/{org_id}/api-keys", headers=admin).json()["api_key"]
    if balance_pence:
        client.post(
            f"/api/admin/orgs/{org_id}/topups",
            json={"amount_pence": balance_pence},
            headers=admin | {"Idempotency-Key": f"seed-{org_id}"},
        ).raise_for_status()
    number_id = f"pn-{org_id}"
    client.post(
        "/api/admin/phone-numbers",
        json={"vapi_phone_number_id": number_id, "org_id": org_id, "assistant_id": "asst-1"},
        headers=admin,
    ).raise_for_status()
    return Org(org_id, api_key, number_id)


def run_locust(
    stack: Stack, scenario: str, config: dict[str, Any], users: int, run_time: str, csv_prefix: Path
) -> dict[str, dict[str, Any]]:
    env = {
        **os.environ,
        "LOADTEST_SCENARIO": scenario,
        "LOADTEST_CONFIG": json.dumps(config),
        "LOADTEST_ADMIN_TOKEN": stack.admin_token,
        "LOADTEST_WEBHOOK_SECRET": stack.webhook_secret,
    }
    command = [
        *processes.tool("locust"),
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "-u",
        str(users),
        "-r",
        str(users),
        "--run-time",
        run_time,
        "--host",
        stack.url,
        "--csv",
        str(csv_prefix),
        "--only-summary",
        "--json-file",
        str(csv_prefix),
        "--stop-timeout",
        "10",
        "--loglevel",
        "WARNING",
    ]
    subprocess.run(command, env=env, check=False, timeout=3600)
    # Counts and percentiles come from the JSON locust writes at shutdown (its CSV files are
    # written on a timer, and are kept for people to read).
    entries = json.loads(Path(f"{csv_prefix}.json").read_text())
    stats: dict[str, dict[str, Any]] = {}
    total = {"Request Count": 0, "Failure Count": 0}
    for entry in entries:
        stats[entry["name"]] = {
            "Request Count": entry["num_requests"],
            "Failure Count": entry["num_failures"],
            "50%": percentile(entry, 0.50),
            "99%": percentile(entry, 0.99),
        }
        total["Request Count"] += entry["num_requests"]
        total["Failure Count"] += entry["num_failures"]
    stats["Aggregated"] = total
    return stats


def percentile(entry: dict[str, Any], fraction: float) -> int:
    """From locust's rounded response-time histogram ({ms: count})."""
    times = sorted((float(ms), count) for ms, count in entry["response_times"].items())
    wanted = fraction * sum(count for _, count in times)
    seen = 0
    for ms, count in times:
        seen += count
        if seen >= wanted:
            return round(ms)
    return 0


def count(stats: dict[str, dict[str, Any]], name: str) -> int:
    return int(stats.get(name, {}).get("Request Count", 0))


def wait_drained_and_reconciled(stack: Stack, client: httpx.Client, orgs: list[Org]) -> tuple[bool, str]:
    """Redis (the wallet) equals the ledger's last balance for every org, and reconcile is clean."""
    deadline = time.monotonic() + drain_timeout_s
    behind: list[str] = []
    while time.monotonic() < deadline:
        behind = []
        for org in orgs:
            auth = {"Authorization": f"Bearer {org.api_key}"}
            wallet = client.get("/api/wallet", headers=auth).json()
            newest = client.get("/api/wallet/transactions?limit=1", headers=auth).json()["items"]
            ledger_balance = newest[0]["balance_after_pence"] if newest else 0
            if wallet["balance_pence"] != ledger_balance:
                behind.append(org.org_id)
        if not behind:
            break
        time.sleep(0.5)
    reconcile = subprocess.run(
        processes.cli("reconcile", "--check"), env=stack.env, capture_output=True, text=True, timeout=600
    )
    summary = reconcile.stdout.strip().splitlines()[-1] if reconcile.stdout.strip() else reconcile.stderr[-500:]
    if behind:
        return False, f"ledger behind Redis for {behind[:5]}; {summary}"
    return reconcile.returncode == 0, summary


def verdict(name: str, checks: list[tuple[str, bool]], details: str) -> bool:
    passed = all(ok for _, ok in checks)
    print(f"\n{'PASS' if passed else 'FAIL'}  {name}")
    for label, ok in checks:
        print(f"  [{'x' if ok else ' '}] {label}")
    print(f"  {details}")
    return passed


def provision_race(stack: Stack, client: httpx.Client, out: Path) -> bool:
    org = make_org(client, stack, "race-provision", PRICE_PENCE)
    stats = run_locust(
        stack, "race", {"kinds": ["provision"], "api_key": org.api_key}, 100, "60s", out / "provision-race"
    )
    ok, reconciled = wait_drained_and_reconciled(stack, client, [org])
    wallet = client.get("/api/wallet", headers={"Authorization": f"Bearer {org.api_key}"}).json()
    assets = [
        i
        for i in client.get("/api/wallet/transactions", headers={"Authorization": f"Bearer {org.api_key}"}).json()[
            "items"
        ]
        if i["kind"] == "asset"
    ]
    created, refused = count(stats, "provision [201]"), count(stats, "provision [402]")
    return verdict(
        "100 concurrent provisions, balance for one",
        [
            (f"exactly 1 succeeded (201): {created}", created == 1),
            (f"99 refused (402): {refused}", refused == 99),
            (f"balance 0 in Redis: {wallet['balance_pence']}", wallet["balance_pence"] == 0),
            (f"exactly 1 asset entry in the ledger: {len(assets)}", len(assets) == 1),
            (f"Redis and ledger agree: {reconciled}", ok),
        ],
        f"stats: {out / 'provision-race_stats.csv'}",
    )


def assistant_request_race(stack: Stack, client: httpx.Client, out: Path) -> bool:
    org = make_org(client, stack, "race-calls", 10_000)
    config = {"kinds": ["assistant-request"], "call_id": "one-call", "number_id": org.number_id}
    stats = run_locust(stack, "race", config, 50, "60s", out / "assistant-request-race")
    ok, reconciled = wait_drained_and_reconciled(stack, client, [org])
    auth = {"Authorization": f"Bearer {org.api_key}"}
    wallet = client.get("/api/wallet", headers=auth).json()
    the_call = client.get("/api/calls/one-call", headers=auth).json()
    held = count(stats, "assistant-request held [200]")
    return verdict(
        "50 concurrent assistant-requests for one call",
        [
            (f"all 50 answered with the assistant: {held}", held == 50),
            (
                f"exactly one hold: live calls {wallet['live_calls']}, held {wallet['held_pence']}p",
                wallet["live_calls"] == 1 and wallet["held_pence"] == 300,
            ),
            (f"the call is live: {the_call.get('status')}", the_call.get("status") == "live"),
            (f"Redis and ledger agree: {reconciled}", ok),
        ],
        f"stats: {out / 'assistant-request-race_stats.csv'}",
    )


def mixed_race(stack: Stack, client: httpx.Client, out: Path) -> bool:
    # 2000p funds two operations of 1000p: a number, or a 5-minute hold at 200p/min.
    org = make_org(client, stack, "race-mixed", 2000, rate_pence_per_minute=200, hold_block_minutes=5)
    config = {"kinds": ["provision", "assistant-request"], "api_key": org.api_key, "number_id": org.number_id}
    stats = run_locust(stack, "race", config, 50, "60s", out / "mixed-race")
    ok, reconciled = wait_drained_and_reconciled(stack, client, [org])
    wallet = client.get("/api/wallet", headers={"Authorization": f"Bearer {org.api_key}"}).json()
    succeeded = count(stats, "provision [201]") + count(stats, "assistant-request held [200]")
    return verdict(
        "25 provisions + 25 assistant-requests racing, 2 fit",
        [
            (f"exactly the 2 that fit succeeded, never more: {succeeded}", succeeded == 2),
            (f"available never below zero: {wallet['available_pence']}p", wallet["available_pence"] >= 0),
            (
                f"what succeeded is what was taken: {2000 - wallet['available_pence']}p = {succeeded} x 1000p",
                2000 - wallet["available_pence"] == succeeded * 1000,
            ),
            (f"Redis and ledger agree: {reconciled}", ok),
        ],
        f"stats: {out / 'mixed-race_stats.csv'}",
    )


def mixed(stack: Stack, client: httpx.Client, out: Path, orgs_count: int, users: int, run_time: str) -> bool:
    orgs = [make_org(client, stack, f"mix-{i:04d}", 50_000) for i in range(orgs_count)]
    config = {"orgs": [org.__dict__ for org in orgs]}
    stats = run_locust(stack, "mixed", config, users, run_time, out / "mixed")
    ok, reconciled = wait_drained_and_reconciled(stack, client, orgs)
    total = stats.get("Aggregated", {})
    failures = int(total.get("Failure Count", 1))
    lines = [
        f"{name:>22}: {row['Request Count']:>6} requests, p50 {row['50%']} ms, p99 {row['99%']} ms"
        for name, row in stats.items()
        if name != "Aggregated"
    ]
    return verdict(
        f"mixed profile: {orgs_count} orgs, {users} users, {run_time}",
        [
            (f"requests: {total.get('Request Count')}, failures: {failures}", failures == 0),
            (f"Redis and ledger agree after the run: {reconciled}", ok),
        ],
        "\n  ".join(lines),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="credit-engine loadtest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("scenario", choices=["provision-race", "assistant-request-race", "mixed-race", "mixed", "all"])
    parser.add_argument("--out", type=Path, default=Path("loadtest-results"), help="where locust's CSV files go")
    parser.add_argument("--orgs", type=int, default=50, help="orgs in the mixed profile")
    parser.add_argument("--users", type=int, default=40, help="simulated users in the mixed profile")
    parser.add_argument("--run-time", default="60s", help="how long the mixed profile runs")
    args = parser.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    scenarios = (
        ["provision-race", "assistant-request-race", "mixed-race", "mixed"]
        if args.scenario == "all"
        else [args.scenario]
    )
    results = []
    with (
        Stack(extra_env={"CREDIT_ENGINE_PHONE_NUMBER_PENCE": str(PRICE_PENCE)}) as stack,
        httpx.Client(base_url=stack.url, timeout=30) as client,
    ):
        for scenario in scenarios:
            if scenario == "provision-race":
                results.append(provision_race(stack, client, args.out))
            elif scenario == "assistant-request-race":
                results.append(assistant_request_race(stack, client, args.out))
            elif scenario == "mixed-race":
                results.append(mixed_race(stack, client, args.out))
            else:
                results.append(mixed(stack, client, args.out, args.orgs, args.users, args.run_time))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
