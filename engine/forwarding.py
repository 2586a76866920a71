"""Standing in front of the platform's own server (issue 13): the engine is the server of every call
it admits (engine/call_server.py), so what the platform's server received from Vapi before, it
now receives from the engine, with the same body and Vapi-style auth.

Where a call's messages go (`Target`): the server URL the platform's own assistant-request answer
named for the call (a transient assistant's `server.url`), else the org's `forward_url` (else the
deployment's `CREDIT_ENGINE_FORWARD_URL`), else the saved assistant's own server URL as Vapi has it
(`GET /assistant/{id}`, cached, when `VAPI_API_KEY` is set). Every one of them was chosen by a
client, so each request goes through the outbound guard (engine/outbound.py: no internal
addresses, pinned connections, bounded time and bytes).

Two ways to forward:
- `relay`: for a message that expects an answer (an assistant-request, tool-calls, ...): at once,
  within the time Vapi gives, and the platform's JSON answer comes back to the caller;
- `enqueue`: for everything else, in the background: a bounded queue per process, senders with
  retries and backoff, and a counter and a log line for what is dropped. Vapi's 200 never waits
  for the platform, and nothing the platform does changes billing.

What is forwarded in the background is best effort: a process that dies loses its queue (a few
seconds of messages at most), as a platform whose server is down would have lost them from Vapi.
"""

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import orjson

from credit_engine.engine.config import Settings
from credit_engine.engine.fire_and_forget import FireAndForget
from credit_engine.engine.outbound import Failure, Outbound

log = logging.getLogger(__name__)

# On everything the engine forwards. A message that arrives with it was forwarded by an engine: a
# URL that leads back to the engine under another name (its IP, a second hostname, a proxy). It is
# answered without being handled or forwarded again, so a loop stops at its first hop.
FORWARDED_HEADER = "X-Credit-Engine-Forwarded"

# Messages whose sender waits for an answer (vapi-contract.md §1): relayed, never queued.
ANSWERED_TYPES = frozenset(
    {
        "assistant-request",
        "tool-calls",
        "transfer-destination-request",
        "knowledge-base-request",
        "handoff-destination-request",
        "voice-request",
        "call.endpointing.request",
    }
)
relay_response_bytes_max = 256 * 1024  # a tool's answer, an assistant: far below the webhook's 2 MiB
queue_size_max = 10_000  # messages waiting to go out, per process
senders = 16  # background POSTs at once, per process
send_total_s_max = 5.0  # one background attempt, from resolving the name to the status
attempts_max = 4
backoff_s_base = 0.5  # doubles per attempt
connections_max = 64
targets_cached_max = 100_000  # calls whose target this process remembers
target_ttl_s = 60.0  # how long a call's resolved target is reused before it is looked up again
assert send_total_s_max * attempts_max < 60


@dataclass(frozen=True)
class Target:
    url: str
    secret: str | None  # sent as X-Vapi-Secret, as Vapi sends the platform's own secret (see forward_secret_for)
    # The operator's own CREDIT_ENGINE_FORWARD_URL: it may be an internal address (the platform's
    # server beside the engine). Every other URL was chosen by an org or its platform and goes
    # through the address rule (engine/outbound.py).
    operators: bool = False


def org_forward_secret(forward_secret: str, org_id: str) -> str:
    """The X-Vapi-Secret an org's own platform gets: derived from CREDIT_ENGINE_FORWARD_SECRET, so the
    operator's platform can check any org's, and an org's platform learns only its own (never the
    secret the operator's platform trusts). Shown to the org by GET /api/forwarding/secret."""
    return hmac.new(forward_secret.encode(), f"forward:{org_id}".encode(), hashlib.sha256).hexdigest()


def forward_secret_for(settings: Settings, org_id: str | None, *, operators: bool) -> str | None:
    """The operator's own URLs (CREDIT_ENGINE_FORWARD_URL, the account's assistants' servers) get the
    forward secret itself; any URL an org or a platform's answer chose gets the org's derived one
    (none when the org is not known)."""
    if settings.forward_secret is None:
        return None
    if operators:
        return settings.forward_secret
    return org_forward_secret(settings.forward_secret, org_id) if org_id is not None else None


@dataclass
class ForwardStats:
    relayed: int = 0
    relay_failed: int = 0
    delivered: int = 0
    retried: int = 0
    dropped_full: int = 0  # the queue was full
    dropped_failed: int = 0  # every attempt failed
    forwarded_back: int = 0  # came back to the engine (FORWARDED_HEADER): not handled again


@dataclass(frozen=True)
class Relayed:
    answer: dict[str, Any] | None  # the platform's JSON object; None when it did not give one
    problem: str  # "" when answer is not None: what went wrong, for the log (never the URL)


@dataclass
class _Queued:
    resolve: "Resolve"  # where it goes, looked up by the sender (the webhook's 200 does not wait)
    body: bytes
    target: Target | None = None
    attempt: int = 0
    enqueued_at: float = field(default_factory=time.monotonic)


Resolve = Callable[[], Awaitable[Target | None]]


class Forwarder:
    """One per web process: the outbound pool, the background queue and its senders."""

    def __init__(
        self, settings: Settings, outbound: Outbound | None = None, count: Callable[[str], None] | None = None
    ) -> None:
        self.settings = settings
        self.outbound = outbound or Outbound(
            allow_private=settings.outbound_allow_private, connections_max=connections_max
        )
        self.operators_outbound = Outbound(allow_private=True, connections_max=connections_max)
        self.queue: asyncio.Queue[_Queued] = asyncio.Queue(maxsize=queue_size_max)
        self.stats = ForwardStats()
        self.count = count or (lambda result: None)
        self.targets: OrderedDict[str, tuple[float, Target | None]] = OrderedDict()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        assert not self._tasks
        self._tasks = [asyncio.create_task(self._send_forever(), name=f"forward-{i}") for i in range(senders)]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.outbound.aclose()
        await self.operators_outbound.aclose()

    def headers(self, target: Target) -> dict[str, str]:
        headers = {"Content-Type": "application/json", FORWARDED_HEADER: "1"}
        if target.secret:
            headers["X-Vapi-Secret"] = target.secret
        return headers

    async def relay(self, target: Target, body: bytes, total_s_max: float) -> Relayed:
        """POST a message that expects an answer; the platform's JSON object, or why not."""
        if total_s_max <= 0:
            return Relayed(None, "no time left")
        outbound = self.operators_outbound if target.operators else self.outbound
        answer = await outbound.post(
            target.url, body, self.headers(target), total_s_max=total_s_max, response_bytes_max=relay_response_bytes_max
        )
        problem = ""
        parsed: Any = None
        if answer.failure is not None or answer.status is None:
            problem = f"no answer ({answer.detail})"
        elif not 200 <= answer.status < 300:
            problem = f"HTTP {answer.status}"
        elif answer.truncated:
            problem = f"an answer over {relay_response_bytes_max} bytes"
        else:
            try:
                parsed = orjson.loads(answer.body)
            except orjson.JSONDecodeError:
                problem = "an answer that is not JSON"
            else:
                if not isinstance(parsed, dict):
                    problem = "an answer that is not a JSON object"
        if problem:
            self.stats.relay_failed += 1
            self.count("relay_failed")
            return Relayed(None, problem)
        self.stats.relayed += 1
        self.count("relayed")
        return Relayed(parsed, "")

    def enqueue(self, resolve: Resolve, body: bytes) -> bool:
        """Forward in the background to where `resolve` says (nowhere: None). False (counted,
        logged) when the queue is full."""
        try:
            self.queue.put_nowait(_Queued(resolve, body))
        except asyncio.QueueFull:
            self.stats.dropped_full += 1
            self.count("dropped_queue_full")
            if self.stats.dropped_full == 1 or self.stats.dropped_full % 1000 == 0:
                log.error(
                    "forwarding queue full (%d messages): %d messages dropped so far; is the platform's server down?",
                    queue_size_max,
                    self.stats.dropped_full,
                )
            return False
        return True

    async def _send_forever(self) -> None:
        """A sender: unbounded on purpose, it runs for the life of the web process. Each has its
        own lean client (engine/fire_and_forget.py: kept-alive connections, not shared)."""
        guarded = FireAndForget(allow_private=self.settings.outbound_allow_private)
        operators = FireAndForget(allow_private=True)
        try:
            while True:
                item = await self.queue.get()
                try:
                    await self._send(guarded, operators, item)
                except Exception:  # a bug, or a store away while resolving: the sender goes on
                    log.exception("forwarding a message failed unexpectedly; dropped")
                    self.stats.dropped_failed += 1
                    self.count("dropped_failed")
                finally:
                    self.queue.task_done()
        finally:
            await guarded.aclose()
            await operators.aclose()

    async def _send(self, guarded: FireAndForget, operators: FireAndForget, item: _Queued) -> None:
        if item.target is None:
            item.target = await item.resolve()
            if item.target is None:
                self.count("no_target")
                return
        item.attempt += 1
        client = operators if item.target.operators else guarded
        answer = await client.post(item.target.url, item.body, self.headers(item.target), total_s_max=send_total_s_max)
        if answer.status is not None and 200 <= answer.status < 300:
            self.stats.delivered += 1
            self.count("delivered")
            return
        if item.attempt >= attempts_max or answer.failure is Failure.refused:  # refused: no attempt will differ
            self.stats.dropped_failed += 1
            self.count("dropped_failed")
            log.warning("forwarding a message gave up after %d attempts (%s)", item.attempt, answer.detail)
            return
        self.stats.retried += 1
        self.count("retried")
        asyncio.get_running_loop().call_later(backoff_s_base * 2 ** (item.attempt - 1), self._requeue, item)

    def _requeue(self, item: _Queued) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.stats.dropped_full += 1

    # The call -> target cache: a call's target is looked up once a minute, not per message.

    def cached_target(self, call_id: str) -> tuple[bool, Target | None]:
        entry = self.targets.get(call_id)
        if entry is None or time.monotonic() - entry[0] > target_ttl_s:
            return False, None
        self.targets.move_to_end(call_id)
        return True, entry[1]

    def cache_target(self, call_id: str, target: Target | None) -> None:
        self.targets[call_id] = (time.monotonic(), target)
        self.targets.move_to_end(call_id)
        while len(self.targets) > targets_cached_max:
            self.targets.popitem(last=False)


class AssistantServers:
    """A saved assistant's own server URL as Vapi has it (`GET /assistant/{id}`), cached: where a
    call's messages went before the engine stood in front of it. Needs VAPI_API_KEY."""

    def __init__(self, settings: Settings, client: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self.client = client or httpx.AsyncClient(timeout=assistant_lookup_s_max)
        self.cache: OrderedDict[str, tuple[float, str | None]] = OrderedDict()
        self.pending: dict[str, asyncio.Future[str | None]] = {}

    async def aclose(self) -> None:
        await self.client.aclose()

    async def server_url(self, assistant_id: str) -> str | None:
        if self.settings.vapi_api_key is None:
            return None
        cached = self.cache.get(assistant_id)
        if cached is not None and time.monotonic() - cached[0] < assistant_ttl_s:
            return cached[1]
        pending = self.pending.get(assistant_id)  # one lookup at a time per assistant
        if pending is None:
            pending = self.pending[assistant_id] = asyncio.ensure_future(self._fetch_and_keep(assistant_id))
            pending.add_done_callback(lambda _: self.pending.pop(assistant_id, None))
        return await asyncio.shield(pending)

    async def _fetch_and_keep(self, assistant_id: str) -> str | None:
        """The lookup, cached by the lookup itself: the answer is in the cache before the lookup
        counts as done, so no caller finds neither a cached answer nor a lookup under way (one
        that did, between the two, asked Vapi a second time)."""
        url = await self._fetch(assistant_id)
        self.cache[assistant_id] = (time.monotonic(), url)
        while len(self.cache) > assistants_cached_max:
            self.cache.popitem(last=False)
        return url

    async def _fetch(self, assistant_id: str) -> str | None:
        try:
            response = await self.client.get(
                f"{self.settings.vapi_base_url}/assistant/{quote(assistant_id, safe='')}",
                headers={"Authorization": f"Bearer {self.settings.vapi_api_key}"},
            )
        except httpx.HTTPError as error:
            log.warning("cannot read assistant %s from Vapi: %s", assistant_id, type(error).__name__)
            return None
        if response.status_code != 200:
            log.warning("reading assistant %s from Vapi: HTTP %d", assistant_id, response.status_code)
            return None
        try:
            server = response.json().get("server") or {}
        except (ValueError, AttributeError):
            return None
        url = server.get("url") if isinstance(server, dict) else None
        return url if isinstance(url, str) and url else None


assistant_lookup_s_max = 3.0
assistant_ttl_s = 300.0  # a changed assistant server URL is picked up within this
assistants_cached_max = 10_000
