"""The lean forwarding client (engine/fire_and_forget.py) against raw servers on loopback that answer
each request with bytes a test scripts: the status it reports, the framing it must skip to reuse a
connection, the resend it may make (only on a kept connection the server closed), the addresses it
may reach and the certificate it must check."""

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from credit_engine.engine.fire_and_forget import FireAndForget, head_bytes_max
from credit_engine.engine.outbound import Failure
from tests.engine.test_outbound import certificate  # noqa: F401  (a fixture)
from tests.served import served_raw

BODY = b'{"message": {"type": "status-update"}}'
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# An answer: the bytes to write, or None to close the connection without a word.
Script = Callable[[int], bytes | None]  # the request's number (from 0, across connections) -> answer


@dataclass
class Server:
    port: int = 0
    scheme: str = "http"
    connections: int = 0
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)

    def url(self, path: str = "/vapi", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


@asynccontextmanager
async def scripted(script: Script, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    the = Server(scheme="https" if ssl_context else "http")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        the.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines if h)}
                body = await reader.readexactly(int(headers["content-length"]))
                the.requests.append((line, headers, body))
                answer = script(len(the.requests) - 1)
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async with served_raw(handle, ssl_context) as port:
        the.port = port
        yield the


@asynccontextmanager
async def client(**kwargs: object) -> AsyncIterator[FireAndForget]:
    the = FireAndForget(allow_private=kwargs.pop("allow_private", True), **kwargs)  # type: ignore[arg-type]
    try:
        yield the
    finally:
        await the.aclose()


async def post_many(the: FireAndForget, url: str, count: int) -> list[tuple[int | None, Failure | None]]:
    results = []
    for _ in range(count):
        posted = await the.post(url, BODY, {"X-Vapi-Secret": "s3"}, total_s_max=2.0)
        results.append((posted.status, posted.failure))
    return results


async def test_the_request_is_a_post_of_the_body_with_the_headers_and_the_path() -> None:
    async with scripted(lambda n: OK) as server, client() as the:
        posted = await the.post(server.url("/vapi/events?x=1"), BODY, {"X-Vapi-Secret": "s3"}, total_s_max=2.0)
    assert (posted.status, posted.failure) == (200, None)
    [(line, headers, body)] = server.requests
    assert line == "POST /vapi/events?x=1 HTTP/1.1"
    assert (headers["host"], headers["x-vapi-secret"], body) == (f"127.0.0.1:{server.port}", "s3", BODY)


@pytest.mark.parametrize(
    "answer",
    [
        OK,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;ext=1\r\n abc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Trailer: 1\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK,
        b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["length", "chunked", "trailers", "no-content", "interim", "no-reason"],
)
async def test_each_framing_is_skipped_exactly_so_the_connection_is_reused(answer: bytes) -> None:
    """Five answers on one connection: a framing misread would leave bytes that the next request
    took for its status line (or wait for bytes that never come)."""
    async with scripted(lambda n: answer) as server, client() as the:
        results = await post_many(the, server.url(), 5)
    assert {status for status, _ in results} == {204 if b"204" in answer else 200}
    assert (server.connections, len(server.requests)) == (1, 5)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\n\r\nbody until the connection ends",
    ],
    ids=["connection-close", "http-1.0", "body-to-the-end"],
)
async def test_an_answer_that_ends_its_connection_gets_a_new_one_for_the_next_request(answer: bytes) -> None:
    async with scripted(lambda n: answer) as server, client() as the:
        results = await post_many(the, server.url(), 3)
    assert results == [(200, None)] * 3
    assert (server.connections, len(server.requests)) == (3, 3)


async def test_a_kept_connection_the_server_closed_is_resent_once_on_a_fresh_one() -> None:
    """The server answers the first request and closes the connection without saying so (as an idle
    timeout does): the second request finds it dead and goes again on a new connection."""
    async with scripted(lambda n: OK if n != 1 else None) as server, client() as the:
        results = await post_many(the, server.url(), 3)
    assert results == [(200, None)] * 3
    assert [body for _, _, body in server.requests] == [BODY] * 4  # the one lost with the dead connection, again
    assert server.connections == 2


async def test_a_fresh_connection_that_fails_is_not_resent() -> None:
    """A request on a new connection that got no answer may have been acted on: sending it again
    is the forwarder's decision (with its backoff), not the client's."""
    async with scripted(lambda n: None) as server, client() as the:
        posted = await the.post(server.url(), BODY, {}, total_s_max=2.0)
    assert (posted.status, posted.failure) == (None, Failure.no_response)
    assert (server.connections, len(server.requests)) == (1, 1)


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 abc Nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (head_bytes_max + 10) + b"\r\n\r\n",
    ],
    ids=["not-http", "bad-status", "bad-length", "negative-length", "bad-chunk", "head-too-big"],
)
async def test_an_answer_that_is_not_http_is_no_response_and_the_connection_is_dropped(answer: bytes) -> None:
    answers = iter([answer, OK])
    async with scripted(lambda n: next(answers)) as server, client() as the:
        results = await post_many(the, server.url(), 2)
    assert results == [(None, Failure.no_response), (200, None)]
    assert server.connections == 2


async def test_an_error_status_is_reported_as_it_is() -> None:
    async with scripted(lambda n: b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy") as server, client() as the:
        results = await post_many(the, server.url(), 2)
    assert results == [(503, None)] * 2
    assert server.connections == 1


async def test_a_server_that_never_answers_costs_the_deadline_and_no_more() -> None:
    silence = asyncio.Event()
    async with scripted(lambda n: None if silence.is_set() else b"HTTP/1.1 200 OK\r\n") as server, client() as the:
        loop = asyncio.get_running_loop()
        started = loop.time()
        posted = await the.post(server.url(), BODY, {}, total_s_max=0.3)
        took = loop.time() - started
    assert (posted.status, posted.failure, posted.detail) == (None, Failure.no_response, "deadline")
    assert 0.25 < took < 1.5
    assert the.connections == {}  # a connection with half an answer on it is never reused


async def test_an_internal_address_is_refused_before_any_connection_unless_allowed() -> None:
    names = {"platform.example.test": ["127.0.0.1"]}

    async def resolver(host: str, port: int) -> list[str]:
        return names[host]

    async with scripted(lambda n: OK) as server:
        async with client(allow_private=False, resolver=resolver) as strict:
            for host in ("platform.example.test", "127.0.0.1", "localhost", "[::1]", "2130706433"):
                posted = await strict.post(server.url(host=host), BODY, {}, total_s_max=2.0)
                assert (posted.status, posted.failure) == (None, Failure.refused), host
        assert server.connections == 0
        async with client(allow_private=True, resolver=resolver) as relaxed:
            posted = await relaxed.post(server.url(host="platform.example.test"), BODY, {}, total_s_max=2.0)
        assert (posted.status, server.requests[0][1]["host"]) == (200, f"platform.example.test:{server.port}")


async def test_a_url_or_header_that_would_smuggle_a_line_is_refused() -> None:
    async with scripted(lambda n: OK) as server, client() as the:
        for url, headers in (
            (server.url(), {"X-Vapi-Secret": "s3\r\nX-Admin: 1"}),
            (server.url(), {"X-Vapi-Secret": "s3\nX-Admin: 1"}),
            (server.url(), {"X-Vapi-Secret": "s3\u2028"}),
            (f"http://user:pw@127.0.0.1:{server.port}/vapi", {}),
            ("ftp://127.0.0.1/vapi", {}),
            (server.url("/vapi\r\nX-Admin: 1"), {}),
        ):
            posted = await the.post(url, BODY, headers, total_s_max=2.0)
            assert (posted.status, posted.failure) == (None, Failure.refused), (url, headers)
        posted = await the.post(server.url("/vapi hooks/é"), BODY, {}, total_s_max=2.0)  # the path is escaped
    assert posted.status == 200
    assert [line for line, _, _ in server.requests] == ["POST /vapi%20hooks/%C3%A9 HTTP/1.1"]


async def test_tls_is_verified_against_the_name(certificate: tuple[Path, Path]) -> None:  # noqa: F811
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    client_tls = ssl.create_default_context(cafile=str(cert))

    async def resolver(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    async with scripted(lambda n: OK, ssl_context=server_tls) as server:
        async with client(resolver=resolver, ssl_context=client_tls) as the:
            right = await post_many(the, server.url(host="alerts.example.test"), 2)
            wrong = await the.post(server.url(host="other.example.test"), BODY, {}, total_s_max=2.0)
    assert right == [(200, None)] * 2
    assert (wrong.status, wrong.failure) == (None, Failure.no_response)  # the certificate names another host
    assert len(server.requests) == 2
