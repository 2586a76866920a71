"""What standing in front of the platform costs (issue 13, point 7), measured side by side.

One embedded Redis and Postgres, two web processes on them (`credit-engine serve`): one with a
forward URL (`CREDIT_ENGINE_FORWARD_URL`, the platform's own server) and one without; and a fake
platform server in a process of its own that answers an assistant-request with a saved assistant
at once. Measured in the same run, interleaved so the machine's noise falls on both:

1. assistant-request latency with forwarding, without it, and of the platform alone (a direct
   POST): what forwarding adds beyond the platform's own time (aim: under 2 ms at p50);
2. the webhook's latency under 1,000 messages a second (conversation-updates, forwarded in the
   background), with forwarding and without: forwarding must not raise the webhook's p99.

    python -m credit_engine.loadtest.forwarding_bench --out docs      # writes docs/forwarding.md
    python -m credit_engine.loadtest.forwarding_bench --quick         # a smoke run, prints only
"""

import argparse
import asyncio
import secrets
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from credit_engine.engine import processes
from credit_engine.engine.embedded import free_port
from credit_engine.loadtest.stack import Stack

PLATFORM_ANSWER = orjson.dumps({"assistantId": "asst-platform"})


# The fake platform: a bare asyncio HTTP/1.1 server (keep-alive), in a process of its own. ----------


async def _platform_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    counts = _platform_connection.counts  # type: ignore[attr-defined]
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length)
            counts["messages"] += 1
            answer = PLATFORM_ANSWER if b'"assistant-request"' in body[:200] else b"{}"
            head_out = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(answer)
            writer.write(head_out + answer)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, asyncio.CancelledError):
        writer.close()  # the client went, or the platform is stopping (its connections cancelled)


async def _serve_platform(port: int, counts_path: Path) -> None:
    _platform_connection.counts = {"messages": 0}  # type: ignore[attr-defined]
    server = await asyncio.start_server(_platform_connection, "127.0.0.1", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()
    counts_path.write_text(str(_platform_connection.counts["messages"]))  # type: ignore[attr-defined]


# The run. -----------------------------------------------------------------------------------


@dataclass
class Options:
    requests: int
    rate_per_s: int
    seconds: int
    out: Path | None


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def call_body(kind: str, call_id: str, number: str) -> bytes:
    message: dict[str, Any] = {
        "type": kind,
        "call": {
            "id": call_id,
            "orgId": "vapi-org",
            "type": "inboundPhoneCall",
            "phoneNumberId": number,
            "createdAt": datetime.now(UTC).isoformat(),
            "updatedAt": datetime.now(UTC).isoformat(),
        },
    }
    if kind == "conversation-update":
        message["messages"] = [{"role": "user", "message": "hello " * 20}]
    return orjson.dumps({"message": message})


async def timed_post(client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]) -> float:
    started = time.perf_counter()
    response = await client.post(url, content=body, headers=headers)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    return elapsed * 1000


async def measure_admissions(
    opts: Options, forwarding: str, plain: str, platform: str, number: str, secret: str
) -> dict[str, list[float]]:
    headers = {"X-Vapi-Secret": secret, "Content-Type": "application/json"}
    times: dict[str, list[float]] = {"with forwarding": [], "without": [], "platform alone": []}
    async with httpx.AsyncClient(timeout=10) as client:
        for i in range(opts.requests):  # interleaved: the machine's noise falls on all three
            body = call_body("assistant-request", f"ar-{i}-{secrets.token_hex(3)}", number)
            times["with forwarding"].append(await timed_post(client, f"{forwarding}/api/vapi/webhook", body, headers))
            body = call_body("assistant-request", f"ar-{i}-{secrets.token_hex(3)}", number)
            times["without"].append(await timed_post(client, f"{plain}/api/vapi/webhook", body, headers))
            times["platform alone"].append(
                await timed_post(client, f"{platform}/vapi", body, {"Content-Type": "application/json"})
            )
    return times


async def measure_background(opts: Options, urls: dict[str, str], number: str, secret: str) -> dict[str, list[float]]:
    """conversation-updates at opts.rate_per_s, open loop, to each web process in turn (windows of
    window_s, interleaved so the machine's noise falls on both): each request's latency, measured
    from when it was due (a late send counts as latency: no coordinated omission). A bare asyncio
    client on keep-alive connections, so that the load generator is not what limits the rate."""
    latencies: dict[str, list[float]] = {name: [] for name in urls}
    body = call_body("conversation-update", f"bg-{secrets.token_hex(4)}", number)
    windows = max(1, opts.seconds // window_s)
    for _ in range(windows):
        for name, url in urls.items():
            latencies[name] += await _open_loop(url, body, secret, opts.rate_per_s, min(window_s, opts.seconds))
    return latencies


window_s = 2
client_connections = 100


async def _open_loop(url: str, body: bytes, secret: str, rate_per_s: int, seconds: int) -> list[float]:
    host, port = url.removeprefix("http://").split(":")
    request = (
        f"POST /api/vapi/webhook HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"X-Vapi-Secret: {secret}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    total = rate_per_s * seconds
    start = time.perf_counter() + 0.2
    latencies: list[float] = []

    async def connection(index: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in range(index, total, client_connections):
                due = start + i / rate_per_s
                if (delay := due - time.perf_counter()) > 0:
                    await asyncio.sleep(delay)
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head[:40]
                length = int(
                    next(
                        line.split(b":", 1)[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    )
                )
                await reader.readexactly(length)
                latencies.append((time.perf_counter() - due) * 1000)
        finally:
            writer.close()

    await asyncio.gather(*(connection(i) for i in range(client_connections)))
    return latencies


def setup_org(stack: Stack, number: str) -> None:
    org_id = f"bench-{secrets.token_hex(3)}"
    with httpx.Client(base_url=stack.url, headers=stack.admin(), timeout=10) as client:
        created = client.post("/api/admin/orgs", json={"org_id": org_id, "name": "Bench", "rate_pence_per_minute": 1})
        assert created.status_code == 201, created.text
        topped = client.post(
            f"/api/admin/orgs/{org_id}/topups", json={"amount_pence": 10**11}, headers={"Idempotency-Key": "bench"}
        )
        assert topped.status_code == 201, topped.text
        registered = client.post(
            "/api/admin/phone-numbers",
            json={"vapi_phone_number_id": number, "org_id": org_id, "assistant_id": "asst-saved"},
        )
        assert registered.status_code == 201, registered.text


def run(opts: Options) -> str:
    platform_port = free_port()
    with Stack(
        extra_env={
            "CREDIT_ENGINE_FORWARD_URL": f"http://127.0.0.1:{platform_port}/vapi",
            "CREDIT_ENGINE_OUTBOUND_ALLOW_PRIVATE": "1",
        }
    ) as stack:
        counts_path = stack.data_dir / "platform-count"
        platform = subprocess.Popen(
            processes.module(
                "credit_engine.loadtest.forwarding_bench",
                "--platform",
                str(platform_port),
                "--platform-counts",
                str(counts_path),
            )
        )
        plain_port = free_port()
        plain_env = {k: v for k, v in stack.env.items() if k != "CREDIT_ENGINE_FORWARD_URL"}
        with open(stack.data_dir / "plain.log", "ab") as log:
            plain = subprocess.Popen(
                processes.cli("serve", "--port", str(plain_port)), env=plain_env, stdout=log, stderr=log
            )
        try:
            _wait_http(f"http://127.0.0.1:{plain_port}/healthz")
            _wait_tcp(platform_port)
            number = f"pn-bench-{secrets.token_hex(3)}"
            setup_org(stack, number)
            admissions = asyncio.run(
                measure_admissions(
                    opts,
                    stack.url,
                    f"http://127.0.0.1:{plain_port}",
                    f"http://127.0.0.1:{platform_port}",
                    number,
                    stack.webhook_secret,
                )
            )
            urls = {"with forwarding": stack.url, "without": f"http://127.0.0.1:{plain_port}"}
            background = asyncio.run(measure_background(opts, urls, number, stack.webhook_secret))
            time.sleep(2)  # the last background forwards
        finally:
            for process in (plain, platform):
                process.send_signal(signal.SIGTERM)
                process.wait(30)
        forwarded = int(counts_path.read_text()) if counts_path.exists() else -1
    return report(opts, admissions, background, forwarded)


def report(
    opts: Options, admissions: dict[str, list[float]], background: dict[str, list[float]], forwarded: int
) -> str:
    p50 = {name: statistics.median(values) for name, values in admissions.items()}
    p99 = {name: pct(values, 0.99) for name, values in admissions.items()}
    added_p50 = p50["with forwarding"] - p50["without"] - p50["platform alone"]
    sent = opts.rate_per_s * opts.seconds
    lines = [
        f"Measured by `{command(opts)}` on {datetime.now(UTC).date()} (this machine, embedded Redis and Postgres, "
        "two `credit-engine serve` processes on them, a fake platform in its own process; interleaved in one run).",
        "",
        "| assistant-request | p50 | p99 |",
        "|---|---|---|",
        *[f"| {name} | {p50[name]:.2f} ms | {p99[name]:.2f} ms |" for name in admissions],
        f"| **added by forwarding** (with − without − the platform alone) | **{added_p50:.2f} ms** | — |",
        "",
        "(Medians subtract; tails do not: a p99 of a sum is not the sum of p99s, so no p99 is derived.)",
        "",
        f"| webhook under {opts.rate_per_s} conversation-updates/s, {opts.seconds} s each (interleaved {window_s} s windows) | p50 | p99 | max |",
        "|---|---|---|---|",
        *[
            f"| {name} | {statistics.median(v):.2f} ms | {pct(v, 0.99):.2f} ms | {max(v):.2f} ms |"
            for name, v in background.items()
        ],
        "",
        f"The platform received {forwarded} messages: {opts.requests} assistant-requests (with forwarding) "
        f"+ {opts.requests} direct + {sent} forwarded conversation-updates = {2 * opts.requests + sent} expected.",
        "",
        f"- {'PASS' if added_p50 < 2.0 else 'MISS'}  added at p50 {added_p50:.2f} ms < 2 ms",
    ]
    return "\n".join(lines) + "\n"


def command(opts: Options) -> str:
    return f"python -m credit_engine.loadtest.forwarding_bench --requests {opts.requests} --rate {opts.rate_per_s} --seconds {opts.seconds}"


def _wait_http(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def _wait_tcp(port: int) -> None:
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("the fake platform did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m credit_engine.loadtest.forwarding_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--requests", type=int, default=1000, help="assistant-requests of each kind")
    parser.add_argument("--rate", type=int, default=1000, help="background messages per second")
    parser.add_argument("--seconds", type=int, default=10, help="how long the background load runs")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 100 requests, 200/s for 2 s")
    parser.add_argument("--out", type=Path, help="write forwarding.md into this folder")
    parser.add_argument("--platform", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--platform-counts", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.platform:
        asyncio.run(_serve_platform(args.platform, args.platform_counts))
        return 0
    opts = Options(100, 200, 2, None) if args.quick else Options(args.requests, args.rate, args.seconds, args.out)
    figures = run(opts)
    print(figures)
    if opts.out is not None:
        _write(opts.out / "forwarding.md", figures)
    return 0


def _write(path: Path, figures: str) -> None:
    intro = (__doc__ or "").split("\n\n")[0].strip() + "\n"
    text = path.read_text() if path.exists() else f"# Forwarding to the platform: what it costs\n\n{intro}\n"
    start, end = "<!-- figures -->", "<!-- end of figures -->"
    if start in text and end in text:
        text = text[: text.index(start) + len(start)] + "\n" + figures + text[text.index(end) :]
    else:
        text += f"\n{start}\n{figures}{end}\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
