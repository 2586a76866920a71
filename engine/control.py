"""Vapi's Live Call Control: which control URLs the engine may POST to, and one POST.

A control URL comes from a webhook (`call.monitor.controlUrl`), and the engine sends it
VAPI_CONTROL_TOKEN. A webhook naming any URL it likes must not turn that into a request (with
our token) to an address of its choosing: a cloud metadata endpoint, an internal service, a host
of its own. So a URL is used only if it is Vapi's:
- https, with no userinfo (`user@`), no backslash, no whitespace, printable ASCII;
- a host equal to, or a subdomain of, one of CREDIT_ENGINE_CONTROL_URL_HOSTS (default `vapi.ai`),
  spelled as a plain DNS name (no IP literal, no trailing dot, no percent-encoding);
- port 443 (named or not); an entry naming a port (`proxy.example:8443`) allows that one instead.
With VAPI_CONTROL_BASE_URL set (a proxy, a test's fake Vapi), the stored URL must still pass
before its scheme and host are replaced: the base URL is ours, the path is the webhook's.
"""

import math
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from credit_engine.engine.config import Settings

control_url_length_max = 2048
# httpcore's pool scans all of its connections for every request and every response (quadratic
# in the connections): at 256 connections in one pool that took 57% of a worker's CPU in a burst
# of end-calls (docs/killswitch-scale.md). So pushes use many small pools instead of one big one.
connections_per_client_max = 16
HOST_PATTERN = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


def control_url_allowed(settings: Settings, url: object) -> bool:
    """May the engine POST a call's control messages (and its token) to `url`? Pure."""
    if not isinstance(url, str) or not 0 < len(url) <= control_url_length_max:
        return False
    if not url.isascii() or not url.isprintable() or " " in url or "\\" in url:
        return False
    try:
        parts = urlsplit(url)
        port = parts.port
        sent_to = httpx.URL(url)  # what the client would connect to must agree with what we checked
    except (ValueError, httpx.InvalidURL):
        return False
    host = parts.hostname
    if parts.scheme != "https" or "@" in parts.netloc or host is None or HOST_PATTERN.fullmatch(host) is None:
        return False
    if sent_to.host != host or sent_to.scheme != "https":
        return False
    for entry in settings.control_url_hosts:
        allowed_host, _, allowed_port = entry.partition(":")
        if host != allowed_host and not host.endswith("." + allowed_host):
            continue
        if (443 if port is None else port) == (int(allowed_port) if allowed_port else 443):
            return True
    return False


def control_target(settings: Settings, control_url: str) -> str:
    """Where a POST for an allowed control URL goes: the URL itself, or its path on the base URL."""
    assert control_url_allowed(settings, control_url)
    base = settings.vapi_control_base_url
    if base is None:
        return control_url
    parts = urlsplit(control_url)
    return base + parts.path + (f"?{parts.query}" if parts.query else "")


def control_body(settings: Settings, kind: str) -> dict[str, Any]:
    assert kind in ("warn", "end")
    if kind == "warn":
        return {"type": "say", "content": settings.kill_warning_text, "endCallAfterSpoken": False}
    return {"type": "end-call"}


@dataclass(frozen=True)
class ControlReply:
    taken: bool  # Vapi answered 2xx
    problem: str = ""  # why not, for the log line (never the URL: it is a capability)
    refused: bool = False  # nothing was sent: no control URL, or not one of Vapi's


async def send_control(
    settings: Settings, http: httpx.AsyncClient, control_url: str | None, kind: str, timeout_s: float
) -> ControlReply:
    """One POST of a warning or an end-call to a call's control URL."""
    if not control_url:
        return ControlReply(False, "no control URL", refused=True)
    if not control_url_allowed(settings, control_url):
        return ControlReply(
            False, f"control URL refused: not https on {', '.join(settings.control_url_hosts)}", refused=True
        )
    token = settings.vapi_control_token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = await http.post(
            control_target(settings, control_url), json=control_body(settings, kind), headers=headers, timeout=timeout_s
        )
    except httpx.HTTPError as error:
        return ControlReply(False, type(error).__name__)
    if not response.is_success:
        return ControlReply(False, f"HTTP {response.status_code}")
    return ControlReply(True)


@dataclass(frozen=True)
class VapiCall:
    """What the kill switch reads of Vapi's record of a call (`GET /call/{id}`)."""

    control_url: str  # monitor.controlUrl, one of Vapi's (control_url_allowed)
    phone_number_id: str | None  # the number it was on
    org_id: str | None  # assistantOverrides.variableValues.org_id: the org the engine (or the platform) named


async def call_at_vapi(settings: Settings, http: httpx.AsyncClient, call_id: str, timeout_s: float) -> VapiCall | None:
    """The call's control URL as Vapi has it (`GET /call/{id}`, `monitor.controlUrl`: vapi-contract
    §5), for a call the engine must end but whose URL it lost (a Redis rebuilt from Postgres, a
    message that never came), with what says whose call it is. None without VAPI_API_KEY, when
    Vapi does not say, or names a URL that is not Vapi's (the same rule as a webhook's)."""
    if settings.vapi_api_key is None:
        return None
    try:
        response = await http.get(
            f"{settings.vapi_base_url}/call/{quote(call_id, safe='')}",
            headers={"Authorization": f"Bearer {settings.vapi_api_key}"},
            timeout=timeout_s,
        )
    except httpx.HTTPError:
        return None
    if not response.is_success:
        return None
    try:
        found = response.json()
    except ValueError:
        return None
    if not isinstance(found, dict) or found.get("id") != call_id:
        return None
    monitor = found.get("monitor")
    url = monitor.get("controlUrl") if isinstance(monitor, dict) else None
    if not isinstance(url, str) or not control_url_allowed(settings, url):
        return None
    overrides = found.get("assistantOverrides")
    variables = overrides.get("variableValues") if isinstance(overrides, dict) else None
    org_id = variables.get("org_id") if isinstance(variables, dict) else None
    number = found.get("phoneNumberId")
    return VapiCall(url, number if isinstance(number, str) else None, org_id if isinstance(org_id, str) else None)


class ControlClients:
    """The HTTP clients for control-URL POSTs: enough small connection pools for `pushes_max`
    POSTs at once (each kept alive: a new TLS handshake per push would cost more than the push).
    Each POST takes the least busy client."""

    def __init__(self, pushes_max: int, *, clients: list[httpx.AsyncClient] | None = None) -> None:
        assert pushes_max >= 1
        self.owned = clients is None
        if clients is None:
            count = math.ceil(pushes_max / connections_per_client_max)
            per_client = math.ceil(pushes_max / count)
            limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
            clients = [httpx.AsyncClient(follow_redirects=False, limits=limits) for _ in range(count)]
        assert clients
        self.clients = clients
        self.busy = [0] * len(clients)

    @classmethod
    def of(cls, http: httpx.AsyncClient) -> "ControlClients":
        """One client the caller owns (and closes): tests, one-off rounds."""
        return cls(1, clients=[http])

    @asynccontextmanager
    async def client(self) -> AsyncIterator[httpx.AsyncClient]:
        index = min(range(len(self.clients)), key=self.busy.__getitem__)
        self.busy[index] += 1
        try:
            yield self.clients[index]
        finally:
            self.busy[index] -= 1

    async def aclose(self) -> None:
        if self.owned:
            for http in self.clients:
                await http.aclose()
