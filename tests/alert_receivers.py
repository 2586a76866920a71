"""Alert receivers that misbehave on purpose: raw HTTP/1.1 servers on a loopback port (no framework,
so they can stall, trickle or stream without end), counting connections, requests in flight and
bytes sent. And a builder for due alert rows."""

import asyncio
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import orjson

from credit_engine.engine.runtime import Runtime
from tests.served import served_raw

ANSWER = "answer"  # the status below, after hold_s, with a short body; keep-alive
SILENT = "silent"  # reads the request, never answers
TRICKLE = "trickle"  # a status line, then a header byte every 0.1 s, forever: no read ever times out
ENDLESS = "endless"  # 200 and a chunked body, as fast as the socket takes it, forever


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()

    @property
    def alert_id(self) -> str:
        return str(orjson.loads(self.body)["id"])


@dataclass
class Receiver:
    mode: str
    status: int = 200
    hold_s: float = 0.0
    port: int = 0
    scheme: str = "http"
    connections: int = 0
    requests: list[Request] = field(default_factory=list)
    in_flight: Counter[str] = field(default_factory=Counter)  # path -> requests being answered
    in_flight_max: Counter[str] = field(default_factory=Counter)
    in_flight_all: int = 0
    in_flight_all_max: int = 0
    bytes_sent: int = 0
    closed_by_client: int = 0

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:  # one request after another on a kept-alive connection, until the client closes
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                path = request_line.split(" ")[1]
                self.requests.append(Request(path, headers, body, time.monotonic()))
                await self._answer(path, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client += 1
        finally:
            writer.close()

    async def _answer(self, path: str, writer: asyncio.StreamWriter) -> None:
        self.in_flight[path] += 1
        self.in_flight_max[path] = max(self.in_flight_max[path], self.in_flight[path])
        self.in_flight_all += 1
        self.in_flight_all_max = max(self.in_flight_all_max, self.in_flight_all)
        try:
            if self.mode == SILENT:
                await asyncio.Event().wait()
            elif self.mode == TRICKLE:
                await self._send(writer, b"HTTP/1.1 200 OK\r\nX-Slow: ")
                while True:
                    await asyncio.sleep(0.1)
                    await self._send(writer, b"a")
            elif self.mode == ENDLESS:
                await self._send(writer, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                chunk = b"%x\r\n%b\r\n" % (64 * 1024, b"x" * 64 * 1024)
                while True:
                    await self._send(writer, chunk)
            else:
                await asyncio.sleep(self.hold_s)
                await self._send(writer, b"HTTP/1.1 %d X\r\nContent-Length: 2\r\n\r\nok" % self.status)
        finally:
            self.in_flight[path] -= 1
            self.in_flight_all -= 1

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await writer.drain()
        self.bytes_sent += len(data)


@asynccontextmanager
async def receiver(
    mode: str, *, status: int = 200, hold_s: float = 0.0, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Receiver]:
    the = Receiver(mode, status=status, hold_s=hold_s, scheme="https" if ssl_context else "http")
    async with served_raw(the.handle, ssl_context) as port:
        the.port = port
        yield the


async def add_alerts(rt: Runtime, org_id: str, count: int) -> list[str]:
    """`count` due alerts for the org, as the ledger writer files them; their ids."""
    ids = [f"{org_id}/low_balance/{n}" for n in range(count)]
    for alert_id in ids:
        payload = {"id": alert_id, "type": "low_balance", "org_id": org_id, "available_pence": 40}
        await rt.pg.execute(
            "INSERT INTO alert_events (org_id, idempotency_key, kind, payload, created_at) "
            "VALUES ($1, $2, 'low_balance', $3::jsonb, now())",
            org_id,
            alert_id,
            payload,  # the pool's jsonb codec encodes it
        )
    return ids


async def alert_rows(rt: Runtime, org_id: str) -> list[tuple[str, str, int, str | None]]:
    """(id, status, attempts, last_error) of each of the org's alerts, oldest first."""
    rows = await rt.pg.fetch(
        "SELECT idempotency_key, status, attempts, last_error FROM alert_events WHERE org_id = $1 ORDER BY id", org_id
    )
    return [(r["idempotency_key"], r["status"], r["attempts"], r["last_error"]) for r in rows]
