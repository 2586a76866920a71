"""Writes docs/benchmarks.md (tables, headline ratios against the targets) and the latency plot."""

import json
import statistics
from pathlib import Path
from typing import Any

from credit_engine.engine import limits

# Targets (issue 4; the CPU one, issue 14), in the project's naming grammar.
status_check_share_of_bare_min = 0.70
status_check_per_cpu_s_share_of_bare_min = 0.75
status_check_over_seed_hot_min = 3.0
status_check_p99_ms_max_at_2000 = 5.0
lua_usec_per_call_max = 10.0
ledger_entries_per_s_min = 20_000
ledger_lag_p99_ms_max = 1_000
reconcile_seconds_max = 60.0


def _find(report: Any, design: str, load: str, mode: str) -> Any:
    for m in report.status_check:
        if (m.design, m.mode) == (design, mode) and m.load == load:
            return m
    return None


def _mark(ok: bool) -> str:
    return "met" if ok else "**missed**"


def side_by_side_headline(report: Any) -> list[str]:
    lines = []
    for side in report.side_by_side:
        ours, bare = statistics.median(side.status_check_per_cpu_s), statistics.median(side.bare_per_cpu_s)
        met = side.ratio >= status_check_per_cpu_s_share_of_bare_min
        lines.append(
            f"- {side.load}, side by side: the status check answers **{ours:,.0f} requests per app CPU-second** = "
            f"**{side.ratio:.2f}× the bare EVALSHA endpoint** ({bare:,.0f}; target ≥ "
            f"{status_check_per_cpu_s_share_of_bare_min}×: {_mark(met)}); each of {len(side.round_ratios)} rounds: "
            f"{min(side.round_ratios):.2f}× to {max(side.round_ratios):.2f}×."
        )
    return lines


def side_by_side_table(report: Any) -> list[str]:
    rows = [
        "| load | status check, requests per CPU-second | bare, requests per CPU-second | ratio | each round "
        "| status check req/s | bare req/s |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for side in report.side_by_side:
        rows.append(
            f"| {side.load} | {statistics.median(side.status_check_per_cpu_s):,.0f} "
            f"| {statistics.median(side.bare_per_cpu_s):,.0f} | **{side.ratio:.2f}×** "
            f"| {', '.join(f'{r:.2f}' for r in side.round_ratios)} "
            f"| {statistics.median(side.status_check_rps):,.0f} | {statistics.median(side.bare_rps):,.0f} |"
        )
    return rows


def headline(report: Any) -> list[str]:
    lines = side_by_side_headline(report)
    loads = sorted({m.load for m in report.status_check})
    for load in loads:
        ours = _find(report, "status-check", load, "saturation")
        bare = _find(report, "bare-evalsha", load, "saturation")
        seed = _find(report, "seed-for-update", load, "saturation")
        if ours and bare and seed:
            share = ours.rps / bare.rps
            over_seed = ours.rps / seed.rps
            line = (
                f"- {load}: status check **{ours.rps:,.0f} req/s** = **{share:.0%} of the bare EVALSHA endpoint** "
                f"({bare.rps:,.0f}; target ≥ 70%: {_mark(share >= status_check_share_of_bare_min)}) and "
                f"**{over_seed:.1f}× the seed's FOR UPDATE design** ({seed.rps:,.0f}"
            )
            if load == "one hot org":
                line += f"; target ≥ 3×: {_mark(over_seed >= status_check_over_seed_hot_min)}"
            lines.append(line + ").")
        fixed = _find(report, "status-check", load, "fixed")
        if fixed:
            lines.append(
                f"- {load}, 2,000 req/s offered: status check p50 {fixed.p50_ms:.2f} ms, **p99 {fixed.p99_ms:.2f} ms** "
                f"(target ≤ 5 ms: {_mark(fixed.p99_ms <= status_check_p99_ms_max_at_2000)})."
            )
    if "hold_check" in report.lua:
        usec = report.lua["hold_check"]["redis_usec_per_call"]
        floor = report.lua.get("empty script (floor)", {}).get("redis_usec_per_call", 0.0)
        lines.append(
            f"- The kill-switch decision (hold_check.lua) takes **{usec:.2f} µs inside Redis** "
            f"(target ≤ 10 µs: {_mark(usec <= lua_usec_per_call_max)}); an empty script called with the same "
            f"keys and arguments takes {floor:.2f} µs on this machine, so the decision itself is "
            f"{usec - floor:.2f} µs of it."
        )
    if report.ledger:
        rate, p99 = report.ledger["drain_entries_per_s"], report.ledger["lag_p99_ms"]
        lines.append(
            f"- The ledger writer drains **{rate:,.0f} entries/s** (target ≥ 20,000: "
            f"{_mark(rate >= ledger_entries_per_s_min)}); under 2,000 money operations/s the outbox lag p99 is "
            f"**{p99:,.0f} ms** (target ≤ 1 s: {_mark(p99 <= ledger_lag_p99_ms_max)})."
        )
    if report.reconcile:
        r = report.reconcile
        lines.append(
            f"- The reconciler rebuilds **{r['orgs']:,} orgs / {r['ledger_entries']:,} ledger entries in "
            f"{r['seconds']:.1f} s** (target ≤ 60 s: {_mark(r['seconds'] <= reconcile_seconds_max)})."
        )
    seed_hot = _find(report, "seed-for-update", "one hot org", "saturation")
    ours_hot = _find(report, "status-check", "one hot org", "fixed")
    if seed_hot and ours_hot:
        lines.append(
            f"- Against the seed's own table (status check 20-50 ms): p50 {ours_hot.p50_ms:.2f} ms here, "
            f"{20 / max(ours_hot.p50_ms, 1e-6):,.0f}× to {50 / max(ours_hot.p50_ms, 1e-6):,.0f}× faster."
        )
    return lines


def status_table(report: Any) -> list[str]:
    rows = [
        "| design | load | mode | req/s | p50 ms | p99 ms | server CPU | req per server CPU-s | Redis/PG CPU "
        "| generator | generator CPU |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for m in report.status_check:
        mode = "saturation" if m.mode == "saturation" else "2,000 req/s"
        rows.append(
            f"| {m.design} | {m.load} | {mode} | {m.rps:,.0f} | {m.p50_ms:.2f} | {m.p99_ms:.2f} | {m.server_cpu:.2f} "
            f"| {m.requests_per_cpu_s:,.0f} | {m.store_cpu:.2f} | {m.generator} | {m.generator_cpu:.2f} |"
        )
    return rows


def plot(report: Any, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(8, 5))
    for design, points in report.sweep.items():
        offered = [p["offered"] for p in points]
        axis.plot(offered, [p["p99_ms"] for p in points], marker="o", label=f"{design} p99")
        axis.plot(offered, [p["p50_ms"] for p in points], marker=".", linestyle="--", label=f"{design} p50")
    axis.set_xlabel("offered load (requests/s, open loop, 10,000 orgs)")
    axis.set_ylabel("latency (ms, log scale)")
    axis.set_yscale("log")
    axis.set_title("Status check vs bare EVALSHA vs the seed's FOR UPDATE design")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


BEFORE_RENOVATION = "benchmarks-before-renovation"


def _per_cpu_s(measured: dict[str, Any]) -> float:
    """Requests per server CPU-second of a saturation figure in a report's JSON: its own, or (runs
    made before the figure existed) requests/s over the server's share of a core."""
    return float(measured.get("requests_per_cpu_s") or measured["rps"] / max(measured["server_cpu"], 1e-9))


def before_and_after(report: Any, out: Path) -> list[str]:
    """This run beside the last run before the renovation (issue 14), kept in docs/ as
    benchmarks-before-renovation.{md,json}."""
    path = out / f"{BEFORE_RENOVATION}.json"
    if not path.exists() or not report.status_check:
        return []
    before = json.loads(path.read_text())
    lines = [
        "",
        "## Before and after the renovation",
        "",
        f"The run of {before['machine']['date']}, before the renovation: [{BEFORE_RENOVATION}.md]"
        f"({BEFORE_RENOVATION}.md) ([JSON]({BEFORE_RENOVATION}.json)). It had no side-by-side section: its "
        "requests per CPU-second are its saturation figures over the server's share of a core.",
        "",
        "| load | design | req/s before | req/s now | requests per CPU-second before | now |",
        "|---|---|---:|---:|---:|---:|",
    ]
    ratios = []
    for load in sorted({m.load for m in report.status_check}):
        per_cpu: dict[str, tuple[float, float]] = {}
        for design in ("status-check", "bare-evalsha"):
            now = _find(report, design, load, "saturation")
            then = next(
                (
                    m
                    for m in before["status_check"]
                    if (m["design"], m["load"], m["mode"]) == (design, load, "saturation")
                ),
                None,
            )
            if now is None or then is None:
                continue
            per_cpu[design] = (_per_cpu_s(then), now.requests_per_cpu_s)
            lines.append(
                f"| {load} | {design} | {then['rps']:,.0f} | {now.rps:,.0f} | {per_cpu[design][0]:,.0f} "
                f"| {now.requests_per_cpu_s:,.0f} |"
            )
        if len(per_cpu) == 2:
            ours, bare = per_cpu["status-check"], per_cpu["bare-evalsha"]
            ratios.append(f"{load}: {ours[0] / bare[0]:.2f}× before, {ours[1] / bare[1]:.2f}× now")
    if ratios:
        lines += ["", f"Status check ÷ bare, requests per CPU-second, each design on its own: {'; '.join(ratios)}."]
    return lines


def write_report(report: Any, out: Path, command: str) -> None:
    m = report.machine
    lines = [
        "# Benchmarks",
        "",
        f"Measured with `{command}` on {m['date']}: {m['cpus']} cores ({m['cpu_model']}), {m['memory_gb']} GB, "
        f"Python {m['python']}, {m['platform']}. Every figure below comes from that one run; the machine is shared "
        "and noisy, so compare the ratios (measured side by side in the same run) more than the absolute numbers.",
        "",
        "Servers: embedded Redis 6.2 (AOF everysec) and Postgres 16 from the project's own wheels, one uvicorn process "
        "per web design (uvloop, httptools), started one at a time (two at once for the side-by-side figures). Load: wrk 4.1 (one thread, 32 connections) at "
        "saturation; at fixed rates, an open-loop generator (`loadtest/rate.py`: 64 keep-alive connections, latency "
        "counted from each request's scheduled time, so queueing is not hidden). Everything shares 2 cores: the CPU "
        "columns (share of one core) say who used what.",
        "",
        "## Headline",
        "",
        *headline(report),
        "",
        "## Status check, side by side",
        "",
        "- **status-check**: `POST /api/vapi/webhook/status-check` as deployed (`credit-engine serve`), served by "
        "the hot lane in front of Starlette's middleware stack (`webapp/hot_lane.py`): body limit, webhook auth "
        "(constant time), JSON body and call id checks, call → org lookup (in-process cache), one `hold_check.lua` "
        "call (its arguments and reply checked), the 20 s request budget, latency histogram and decision counter, "
        "JSON answer.",
        "- **bare-evalsha**: the practical limit: the same web server (uvicorn, uvloop, httptools), a Starlette "
        "route with no middleware, the web app's own Redis client and the same script, and nothing else "
        "(`loadtest/bare_app.py`).",
        "- **seed-for-update**: the seed's design: a PL/pgSQL function that locks the org row (`SELECT … FOR UPDATE`) "
        "and computes the effective balance, one asyncpg round trip (`loadtest/seed_app.py`).",
        "",
    ]
    if report.side_by_side:
        lines += [
            "CPU per request, side by side: both servers up, their wrk runs (one thread, 32 connections, saturation) "
            "taking turns, status check then bare, so whatever else runs on the machine falls on both alike. Each "
            "figure is requests answered per CPU-second of the server process over that run (wrk's request count "
            "÷ the process's user + system CPU time); the ratio is of the medians (target ≥ "
            f"{status_check_per_cpu_s_share_of_bare_min}×, issue 14).",
            "",
            *side_by_side_table(report),
            "",
            "Each design on its own (started one at a time):",
            "",
        ]
    lines += [*status_table(report), ""]
    if plot(report, out / "benchmark-latency.png"):
        lines += ["![latency vs offered load](benchmark-latency.png)", ""]
    lines += [
        "Offered load sweep (10,000 orgs; a design's sweep stops once it falls behind the offered rate):",
        "",
        "| design | offered req/s | achieved | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for design, points in report.sweep.items():
        for p in points:
            lines.append(
                f"| {design} | {p['offered']:,} | {p['achieved']:,.0f} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} |"
            )
    lines += [
        "",
        "## The Lua decision",
        "",
        "| script | at the client (µs per call, round trip) | inside Redis (µs per call) |",
        "|---|---:|---:|",
    ]
    for name, v in report.lua.items():
        label = name if "(" in name else f"{name}.lua"
        lines.append(f"| {label} | {v['client_round_trip_us']:.1f} | {v['redis_usec_per_call']:.2f} |")
    lines += [
        "",
        "## Money endpoints at a fixed rate",
        "",
        "| endpoint | rate | p50 ms | p99 ms | non-2xx |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, v in report.endpoints.items():
        lines.append(f"| {name} | {v['rate']}/s | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | {v['non_2xx']} |")
    if report.ledger:
        ledger = report.ledger
        lines += [
            "",
            "## Ledger writer",
            "",
            f"- Drain: {ledger['prefilled_entries']:,} asset deductions waiting in 1,000 orgs' outboxes, drained by the "
            f"real worker process at **{ledger['drain_entries_per_s']:,} entries/s** (one transaction per batch of up "
            f"to {limits.settle_batch_size_max:,}, with the ledger's chain and projection triggers checking every row).",
            f"- Lag: {ledger['lag_entries']:,} deductions at {ledger['lag_rate_per_s']:,}/s while the worker drains; lag is "
            "each entry's `recorded_at − created_at` (Redis TIME at the decision, Postgres time of the insert, same "
            f"machine clock): p50 {ledger['lag_p50_ms']:,} ms, **p99 {ledger['lag_p99_ms']:,} ms**, max {ledger['lag_max_ms']:,} ms.",
        ]
        if ledger.get("lag_not_sent"):
            lines.append(
                f"- {ledger['lag_not_sent']:,} more deductions failed at the bench's own Redis client (a RedisError, "
                "before the worker could see them): the machine was too busy for the "
                "open loop's rate. They are not in the lag."
            )
    if report.reconcile:
        r = report.reconcile
        lines += [
            "",
            "## Reconciler",
            "",
            f"Rebuild of {r['orgs']:,} orgs with {r['ledger_entries']:,} ledger entries (all inside the idempotency "
            f"window, so every credit and deduction comes back as an idempotency record: {r['idempotency_records_per_org']} "
            f"per org) and {r['live_holds']:,} live holds into an empty Redis: **{r['seconds']:.1f} s**.",
        ]
    lines += before_and_after(report, out)
    lines += [
        "",
        "## What is left, and why",
        "",
        "- **The status check against the seed.** The practical ceiling is the bare endpoint (same web stack, one "
        "EVALSHA, nothing else), and the table shows it is itself well under 3× the seed's `FOR UPDATE` design: with "
        "one uvicorn process on 2 shared cores, Python's per-request HTTP handling dominates every design, so 3× the "
        "seed is out of reach for any one-process Python web tier. Over many uncontended orgs the seed's single "
        "Postgres round trip costs about what our handling does; what it costs instead is Postgres CPU (see the "
        "Redis/PG column) and latency under contention (the hot org). What the engine controls is the gap to the "
        "ceiling (status-check / bare); more throughput comes from more web processes, which a hot row's lock "
        "cannot have.",
        "- **The status check against the bare endpoint.** What is left between them is the checks themselves: "
        "the webhook secret compared in constant time, the body parsed and the call id validated, the call's org "
        "looked up, the script's keys, arguments and reply checked, the request budget's timer, the latency "
        "histogram and the decision counter, and a fuller answer. The hot lane took out what was not a check "
        "(Starlette's middleware layers and its router, which tried every other route's pattern first).",
        "- **The Lua decision.** `hold_check.lua` is measured beside an empty script: the empty script's cost is "
        "what EVALSHA itself costs in this Redis build, and no script can go under it. The rest is one HMGET, one "
        "HGET, parsing the hold and the reply.",
        "- **The ledger writer** is Python-bound (asyncpg encoding, one transaction per batch, the chain and "
        "projection triggers in Postgres), far above the rate the web tier can decide at on the same machine.",
        "- **Lag** is measured while the load generator, the web server, Redis, Postgres and the worker share 2 "
        "cores: its p99 is mostly the worker waiting for CPU, not batching.",
        "- **Noise**: repeated runs here move saturation figures by 10–20%; the ratios, measured side by side in one "
        "run, move much less.",
        "",
        "Raw figures: [benchmarks.json](benchmarks.json).",
        "",
    ]
    (out / "benchmarks.md").write_text("\n".join(lines))
