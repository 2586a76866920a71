"""An open-loop HTTP load generator: requests at a fixed rate, latency from the scheduled send time.

wrk measures saturation well but cannot hold a fixed rate; this does. Each request is due at
start + i / rate; its latency counts from that moment, not from when a connection became free,
so a server that stalls cannot hide its queue (no coordinated omission). HTTP/1.1 keep-alive over
raw asyncio connections on uvloop keeps the generator cheap; its own CPU use is reported beside
the server's.
"""

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import uvloop

connect_timeout_s = 5.0
response_timeout_s = 10.0


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transport is its own class

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        status = self._complete_response()
        if status is not None and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))

    def _complete_response(self) -> int | None:
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        head = bytes(self.buffer[:head_end]).decode("latin-1")
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        total = head_end + 4 + length
        if len(self.buffer) < total:
            return None
        del self.buffer[:total]
        return int(head.split(" ", 2)[1])

    async def request(self, raw: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await asyncio.wait_for(self.waiter, response_timeout_s)


@dataclass
class RateResult:
    rate_offered: float
    duration_s: float
    latencies_us: list[int] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    generator_cpu_s: float = 0.0

    @property
    def completed(self) -> int:
        return len(self.latencies_us)

    @property
    def rate_achieved(self) -> float:
        return self.completed / self.duration_s

    def percentile_ms(self, fraction: float) -> float:
        if not self.latencies_us:
            return float("nan")
        ordered = sorted(self.latencies_us)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1000


def http_request(method: str, path: str, host: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _run(
    host: str, port: int, make: Callable[[int], bytes], rate: float, duration_s: float, connections: int
) -> RateResult:
    loop = asyncio.get_running_loop()
    idle: asyncio.Queue[_Connection] = asyncio.Queue()
    for _ in range(connections):
        _, protocol = await asyncio.wait_for(loop.create_connection(_Connection, host, port), connect_timeout_s)
        idle.put_nowait(protocol)
    result = RateResult(rate, duration_s)
    total = int(rate * duration_s)
    cpu_started = time.process_time()
    # perf_counter, not loop.time(): uvloop's loop clock is libuv's, cached to the millisecond.
    clock = time.perf_counter
    started = clock() + 0.05
    pending: set[asyncio.Task[None]] = set()

    async def one(index: int, due: float) -> None:
        connection = await idle.get()
        try:
            status = await connection.request(make(index))
            result.latencies_us.append(int((clock() - due) * 1_000_000))
            result.statuses[status] += 1
            idle.put_nowait(connection)
        except (ConnectionError, TimeoutError):
            result.errors += 1

    for index in range(total):
        due = started + index / rate
        delay = due - clock()
        if delay > 0.001:
            await asyncio.sleep(delay)
        task = loop.create_task(one(index, due))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=response_timeout_s)
    result.generator_cpu_s = time.process_time() - cpu_started
    return result


def run_at_rate(
    host: str, port: int, make: Callable[[int], bytes], rate: float, duration_s: float, connections: int = 64
) -> RateResult:
    """Send int(rate * duration_s) requests, the i-th built by make(i), at `rate` per second."""
    return uvloop.run(_run(host, port, make, rate, duration_s, connections))
