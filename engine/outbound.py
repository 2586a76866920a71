"""Outbound HTTP to an address someone else chose (an org's alert webhook): which addresses may be
called, and a connection that reaches only an address that was checked.

The rule (`address_allowed`): http and https only; every address the host stands for must be a
public unicast address. Refused: loopback, private (RFC 1918, fc00::/7), link-local (169.254/16 with
the cloud metadata address, fe80::/10), CGNAT 100.64/10, unspecified, multicast, broadcast,
reserved and documentation ranges, the IPv6 forms that carry an IPv4 address (IPv4-mapped ones are
judged by the IPv4 address they carry; IPv4-compatible, NAT64, 6to4 and Teredo are refused), scoped
addresses, and the names `localhost` and `*.localhost`. A host that is an IP literal, including
the old forms `127.1`, `0x7f000001` and `2130706433` that the resolver takes as numbers, is judged
directly; a name is resolved and refused if any of its addresses is refused.
`CREDIT_ENGINE_OUTBOUND_ALLOW_PRIVATE` turns the address rule off (development and tests, whose
receivers listen on 127.0.0.1); the scheme rule stays.

Two checks. When a URL is saved (`url_refusal`): the admin gets a clear refusal; a name that does
not resolve then is accepted, because the check that matters is the second. When a request is
sent, the check runs inside the connection pool's network backend (`PinnedBackend.connect_tcp`):
it receives exactly the host the pool is about to connect to (no second URL parser to disagree
with), resolves it once, checks every address, and opens the socket to one of those checked
addresses. No later lookup happens, so DNS rebinding between check and connect reaches nothing.
httpcore then starts TLS with the URL's name as `server_hostname`, so the certificate is verified
against the name, never the IP, and the pool keys connections by (scheme, name, port), so a kept
connection is reused only for the same name. httpcore reads no proxy from the environment and
follows no redirects.

Every request is bounded (`Outbound.post`): one deadline for the whole of it (resolve, connect,
TLS, send, response headers, the bit of body read), at most `response_bytes_max` of the body read
(we need the status only), headers bounded by httpcore's 100 KiB limit. What the org may read
about a failure is one of `Failure`'s coarse categories: it never tells a closed port from a
silent one, nor a name that does not resolve from a host that does not answer.
"""

import asyncio
import base64
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import unquote

import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]  # (host, port) -> addresses, in preference order

addresses_per_host_max = 8  # addresses tried (and all checked) per connection
resolve_s_max = 2.0  # a save-time lookup; a send-time one is inside the request's deadline
keepalive_s_max = 30.0

BLOCKED_V4 = tuple(
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)
BLOCKED_V6 = tuple(
    ipaddress.IPv6Network(net)
    for net in (
        "::/96",
        "64:ff9b::/96",
        "64:ff9b:1::/48",
        "100::/64",
        "2001::/23",
        "2001:db8::/32",
        "2002::/16",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    )
)
LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


class Failure(str, Enum):
    """What a failed request is called where the org can read it (alert_events.last_error)."""

    refused = "refused: address not allowed"
    no_response = "no response"  # no status line within the deadline, for whatever reason


class AddressRefused(Exception):
    """The host is, or resolves to, an address the rule refuses. Raised before any connection."""


def address_allowed(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return False
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
    blocked: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = (
        BLOCKED_V4 if isinstance(address, ipaddress.IPv4Address) else BLOCKED_V6
    )
    if any(address in network for network in blocked):
        return False
    return address.is_global  # catches what the lists miss, by Python's own registry


def literal_address(host: str) -> IPAddress | None:
    """The address if `host` is an IP literal, in any form the resolver would take as a number."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))  # 127.1, 0x7f.1, 2130706433
    except (OSError, UnicodeError, ValueError):
        return None


def name_refused(host: str) -> bool:
    name = host.rstrip(".").lower()
    return not name or name in LOCAL_NAMES or name.endswith(".localhost")


async def resolve(host: str, port: int) -> list[str]:
    """The system resolver, each address once, in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in addresses:
            addresses.append(address)
    return addresses


async def addresses_checked(host: str, port: int, *, allow_private: bool, resolver: Resolver) -> list[str]:
    """The addresses to connect to for `host`, every one allowed; AddressRefused if any is not.
    OSError (gaierror) if the name does not resolve."""
    literal = literal_address(host)
    if literal is not None:
        if not allow_private and not address_allowed(literal):
            raise AddressRefused()
        return [str(literal)]
    if not allow_private and name_refused(host):
        raise AddressRefused()
    addresses = (await resolver(host, port))[:addresses_per_host_max]
    if not addresses:
        raise socket.gaierror(socket.EAI_NONAME, "no address")
    if not allow_private and not all(address_allowed(ipaddress.ip_address(a)) for a in addresses):
        raise AddressRefused()
    return addresses


def parse_url(url: str) -> httpx.URL | None:
    """The URL if it is an absolute http(s) URL with a host, else None."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, UnicodeError):
        return None
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        return None
    return parsed


async def url_refusal(url: str, *, allow_private: bool, resolver: Resolver = resolve) -> str | None:
    """Save time: why this URL may not be called, or None. A name that does not resolve (or not
    within resolve_s_max) passes: it is checked again, and pinned, each time it is called."""
    parsed = parse_url(url)
    if parsed is None:
        return "must be an http(s) URL"
    host = parsed.raw_host.decode("ascii")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        async with asyncio.timeout(resolve_s_max):
            await addresses_checked(host, port, allow_private=allow_private, resolver=resolver)
    except AddressRefused:
        return "must not point at a loopback, private, link-local or other internal address"
    except (OSError, TimeoutError, ValueError):  # ValueError: UnicodeError, a name the resolver will not take
        return None
    return None


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, checking each host before connecting to one of its checked
    addresses (see the module docstring)."""

    def __init__(self, *, allow_private: bool, resolver: Resolver) -> None:
        self._allow_private = allow_private
        self._resolver = resolver
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await addresses_checked(host, port, allow_private=self._allow_private, resolver=self._resolver)
        except (OSError, ValueError) as error:
            raise httpcore.ConnectError(f"does not resolve: {type(error).__name__}") from None
        assert 1 <= len(addresses) <= addresses_per_host_max
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                failure = error
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise AddressRefused()  # never configured; refused rather than trusted

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: failed before a status line
    failure: Failure | None  # what the caller may tell the URL's owner
    detail: str  # for our own log lines only: the exception's class, never the URL
    body_bytes_read: int = 0
    body: bytes = b""  # what was read of the body (at most response_bytes_max)
    truncated: bool = False  # the body was longer than response_bytes_max


class Outbound:
    """A connection pool for calling URLs that orgs chose: pinned, bounded, no redirects, no proxy."""

    def __init__(
        self,
        *,
        allow_private: bool,
        connections_max: int,
        resolver: Resolver = resolve,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        assert connections_max >= 1
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context if ssl_context is not None else ssl.create_default_context(),
            max_connections=connections_max,
            max_keepalive_connections=connections_max,
            keepalive_expiry=keepalive_s_max,
            http1=True,
            http2=False,
            retries=0,
            network_backend=PinnedBackend(allow_private=allow_private, resolver=resolver),
        )

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def post(
        self, url: str, body: bytes, headers: dict[str, str], *, total_s_max: float, response_bytes_max: int
    ) -> Answer:
        """POST `body`; the status, read within total_s_max, and at most response_bytes_max of the body."""
        assert total_s_max > 0
        assert response_bytes_max >= 0
        parsed = parse_url(url)
        if parsed is None:
            return Answer(None, Failure.refused, "not an http(s) URL")
        target = httpcore.URL(scheme=parsed.raw_scheme, host=parsed.raw_host, port=parsed.port, target=parsed.raw_path)
        sent = {"Host": parsed.netloc.decode("ascii"), **headers}
        if parsed.userinfo:
            user, _, password = parsed.userinfo.decode("ascii").partition(":")
            credentials = f"{unquote(user)}:{unquote(password)}".encode()
            sent["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
        timeouts = {"connect": total_s_max, "read": total_s_max, "write": total_s_max, "pool": total_s_max}
        try:
            async with asyncio.timeout(total_s_max):
                return await self._post(target, body, sent, timeouts, response_bytes_max)
        except AddressRefused:
            return Answer(None, Failure.refused, "address refused")
        except TimeoutError:
            return Answer(None, Failure.no_response, "deadline")
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError, OSError) as error:
            return Answer(None, Failure.no_response, type(error).__name__)

    async def _post(
        self, target: httpcore.URL, body: bytes, headers: dict[str, str], timeouts: dict[str, float], bytes_max: int
    ) -> Answer:
        read = 0
        chunks: list[bytes] = []
        truncated = False
        request = self._pool.stream(
            "POST", target, headers=list(headers.items()), content=body, extensions={"timeout": timeouts}
        )
        async with request as response:
            if bytes_max > 0:
                async for chunk in response.aiter_stream():
                    read += len(chunk)
                    chunks.append(chunk)
                    if read > bytes_max:
                        truncated = True
                        break  # the rest is never read: leaving the block closes the connection
            content = b"".join(chunks)[:bytes_max]
            return Answer(response.status, None, f"HTTP {response.status}", read, content, truncated)
