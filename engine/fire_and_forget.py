"""A lean HTTP/1.1 POST for forwarding in the background: status only, body discarded.

Forwarding a thousand messages a second through httpcore cost about 0.6 ms of CPU each in the web
process (its pool bookkeeping and h11's parser, in Python), which is most of a core beside the
webhook's own work (docs/forwarding.md). This client does the least a POST needs: one kept-alive
connection per (scheme, host, port) and sender, a request written as bytes, the status line and
headers read, the body skipped by its length (or its chunks). Every connection goes through the
same address rule as every request to a URL a client chose (engine/outbound.py): the name is
resolved once per connection, every address checked, and the socket opened to a checked address
(TLS still verifies the name). No redirects, no proxies, bounded time and header size.
Answers that the caller needs (relays, alerts) keep using engine/outbound.Outbound.
"""

import asyncio
import ssl
from dataclasses import dataclass

import httpx

from credit_engine.engine.outbound import AddressRefused, Failure, Resolver, addresses_checked, parse_url, resolve

head_bytes_max = 16 * 1024  # status line and headers of one response
skip_chunk = 64 * 1024


@dataclass(frozen=True)
class Posted:
    status: int | None  # None: no status line (refused, unreachable, timed out, not HTTP)
    failure: Failure | None
    detail: str  # for our own logs: never the URL


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


class FireAndForget:
    """One per sender task (connections are not shared between tasks, so no locking)."""

    def __init__(
        self, *, allow_private: bool, resolver: Resolver = resolve, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.allow_private = allow_private
        self.resolver = resolver
        self.ssl_context = ssl_context if ssl_context is not None else ssl.create_default_context()
        self.connections: dict[tuple[str, str, int], _Connection] = {}

    async def aclose(self) -> None:
        for connection in self.connections.values():
            connection.writer.close()
        self.connections.clear()

    async def post(self, url: str, body: bytes, headers: dict[str, str], *, total_s_max: float) -> Posted:
        parsed = parse_url(url)
        if parsed is None or parsed.userinfo:
            return Posted(None, Failure.refused, "not a plain http(s) URL")
        request = _request_bytes(parsed, body, headers)
        if isinstance(request, str):
            return Posted(None, Failure.refused, request)
        key = (parsed.scheme, parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80))
        try:
            async with asyncio.timeout(total_s_max):
                return await self._send(key, request)
        except AddressRefused:
            return Posted(None, Failure.refused, "address refused")
        except TimeoutError:
            self._drop(key)
            return Posted(None, Failure.no_response, "deadline")
        except (OSError, ValueError, UnicodeError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
            self._drop(key)
            return Posted(None, Failure.no_response, type(error).__name__)

    async def _send(self, key: tuple[str, str, int], request: bytes) -> Posted:
        """On the connection kept for `key`, or a new one. A kept-alive connection the server had
        closed fails at once: the request goes once more, on a fresh one."""
        while True:
            connection, reused = await self._connection(key)
            try:
                status, keep = await self._exchange(connection, request)
            except (ConnectionError, asyncio.IncompleteReadError):
                self._drop(key)
                if reused:
                    continue
                raise
            if not keep:
                self._drop(key)
            return Posted(status, None, f"HTTP {status}")

    async def _connection(self, key: tuple[str, str, int]) -> tuple[_Connection, bool]:
        """(a connection, whether it was kept from an earlier request)."""
        connection = self.connections.get(key)
        if connection is not None and not connection.writer.is_closing() and not connection.reader.at_eof():
            return connection, True
        self._drop(key)
        scheme, host, port = key
        addresses = await addresses_checked(host, port, allow_private=self.allow_private, resolver=self.resolver)
        failure: OSError | None = None
        for address in addresses:
            try:
                if scheme == "https":
                    reader, writer = await asyncio.open_connection(
                        address, port, ssl=self.ssl_context, server_hostname=host, limit=head_bytes_max
                    )
                else:
                    reader, writer = await asyncio.open_connection(address, port, limit=head_bytes_max)
            except OSError as error:
                failure = error
                continue
            connection = self.connections[key] = _Connection(reader, writer)
            return connection, False
        assert failure is not None
        raise failure

    async def _exchange(self, connection: _Connection, request: bytes) -> tuple[int, bool]:
        """Send; read the status and headers; skip the body. (status, connection reusable)."""
        connection.writer.write(request)
        await connection.writer.drain()
        while True:
            head = await connection.reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
            parts = status_line.split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise ValueError("not an HTTP/1.x response")
            status = int(parts[1])
            if not 100 <= status < 200 or status == 101:
                break  # 1xx before the answer (100 Continue, 103 Early Hints): read on
        if status == 101:
            return status, False  # switched to something else: not ours to read
        fields = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        keep = fields.get("connection", "").lower() != "close" and parts[0] == "HTTP/1.1"
        if "chunked" in fields.get("transfer-encoding", "").lower():
            await self._skip_chunks(connection.reader)
        elif "content-length" in fields:
            await self._skip(connection.reader, int(fields["content-length"]))
        elif status not in (204, 304):
            keep = False  # the body runs to the connection's end: not worth reading
        return status, keep

    async def _skip(self, reader: asyncio.StreamReader, length: int) -> None:
        if length < 0:
            raise ValueError("negative content length")
        while length > 0:
            chunk = await reader.read(min(length, skip_chunk))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", length)
            length -= len(chunk)

    async def _skip_chunks(self, reader: asyncio.StreamReader) -> None:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)  # an empty size line is not a chunk: ValueError
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, if any, then the blank line
                    pass
                return
            await self._skip(reader, size + 2)  # the chunk and its CRLF

    def _drop(self, key: tuple[str, str, int]) -> None:
        connection = self.connections.pop(key, None)
        if connection is not None:
            connection.writer.close()


def _request_bytes(parsed: httpx.URL, body: bytes, headers: dict[str, str]) -> bytes | str:
    """The request as sent, or why it cannot be: a header value that would start a header of its
    own (a line break), or one that is not latin-1."""
    lines = [f"POST {parsed.raw_path.decode('ascii')} HTTP/1.1", f"Host: {parsed.netloc.decode('ascii')}"]
    lines += [f"Content-Length: {len(body)}", *(f"{name}: {value}" for name, value in headers.items())]
    if any(len(line.splitlines()) != 1 for line in lines):
        return "a line break in a header"
    try:
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    except UnicodeEncodeError:
        return "a header that is not latin-1"
