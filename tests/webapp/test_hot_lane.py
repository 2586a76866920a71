"""The hot lane (webapp/hot_lane.py) answers Vapi's two endpoints exactly as Starlette's stack did:
every request here goes to the same app twice, once through the lane and once through Starlette's
own middleware stack (the lane left out), and the two answers must match to the byte: status,
headers and body. Each case is a check the lane could have skipped."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.applications import Starlette
from starlette.routing import Router
from starlette.types import Receive, Scope, Send

from credit_engine.engine.call_server import STATUS_CHECK_PATH, WEBHOOK_PATH
from credit_engine.engine.clock import ManualClock
from credit_engine.engine.config import Settings
from credit_engine.webapp import app as app_module
from credit_engine.webapp import vapi as vapi_module
from credit_engine.webapp.app import Budget, CreditEngineApp, create_app
from credit_engine.webapp.hot_lane import HotLane
from tests.webapp.conftest import WEBHOOK_SECRET, Api
from tests.webapp.vapi_payloads import assistant_request, call, status_update

BODY_MAX = 4096  # the webhook paths' limit here, small enough to go over
SECRET = {"X-Vapi-Secret": WEBHOOK_SECRET}


def starlette_only(app: CreditEngineApp) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The same app (routes, state, handlers, middleware) through Starlette's stack alone."""
    stack = Starlette.build_middleware_stack(app)

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = app
        await stack(scope, receive, send)

    return asgi


class Both:
    def __init__(self, app: CreditEngineApp, lane: httpx.AsyncClient, plain: httpx.AsyncClient, api: Api) -> None:
        self.app, self.lane, self.plain, self.api = app, lane, plain, api

    async def same(self, method: str, path: str, **request: Any) -> httpx.Response:
        """The answer through the lane, checked against Starlette's answer to the same request."""
        return await self.same_of(method, path, lambda: request)

    async def same_of(self, method: str, path: str, request: Callable[[], dict[str, Any]]) -> httpx.Response:
        """As `same`, the request made afresh for each (a streamed body is read once)."""
        ours = await self.lane.request(method, path, **request())
        theirs = await self.plain.request(method, path, **request())
        assert (ours.status_code, ours.headers.multi_items(), ours.content) == (
            theirs.status_code,
            theirs.headers.multi_items(),
            theirs.content,
        )
        return ours

    async def live_call(self, call_id: str) -> None:
        org, _ = await self.api.new_org(10_000)
        number = await self.api.register_number(org)
        the_call = call(call_id, phone_number_id=number)
        assert "assistantId" in (await self.api.vapi(assistant_request(the_call))).json()
        assert (await self.api.vapi(status_update(the_call, "in-progress"))).json() == {}


@pytest.fixture
async def both(app_settings: Settings, clock: ManualClock) -> AsyncIterator[Both]:
    settings = replace(app_settings, webhook_body_bytes_max=BODY_MAX)
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        base = "http://credit-engine.test"
        # raise_app_exceptions=False: the client gets the 500 the app answered, as a server's would.
        lane_transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        plain_transport = httpx.ASGITransport(app=starlette_only(app), raise_app_exceptions=False)
        async with (
            httpx.AsyncClient(transport=lane_transport, base_url=base) as lane,
            httpx.AsyncClient(transport=plain_transport, base_url=base) as plain,
        ):
            yield Both(app, lane, plain, Api(lane, settings))
    from tests.conftest import delete_prefix

    assert settings.redis_url is not None
    await delete_prefix(settings.redis_url, settings.key_prefix)


@pytest.fixture
def router_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The paths Starlette's router was asked to route."""
    seen: list[str] = []
    route = Router.__call__

    async def counted(self: Router, scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["path"])
        await route(self, scope, receive, send)

    monkeypatch.setattr(Router, "__call__", counted)
    yield seen


async def test_the_lane_takes_the_two_posts_and_nothing_else(both: Both, router_calls: list[str]) -> None:
    await both.lane.post(STATUS_CHECK_PATH, json={"call_id": "c-1"}, headers=SECRET)
    await both.lane.post(WEBHOOK_PATH, content=b'{"message":{"type":"hang"}}', headers=SECRET)
    assert router_calls == []
    assert isinstance(both.app.middleware_stack, HotLane)
    await both.lane.get(STATUS_CHECK_PATH)  # another method
    await both.lane.post(STATUS_CHECK_PATH + "/", json={"call_id": "c-1"}, headers=SECRET)  # another path
    await both.lane.get("/healthz")
    assert router_calls == [STATUS_CHECK_PATH, STATUS_CHECK_PATH + "/", "/healthz"]


async def test_status_check_answers_match(both: Both) -> None:
    await both.live_call("live-1")
    answer = await both.same("POST", STATUS_CHECK_PATH, json={"call_id": "live-1"}, headers=SECRET)
    assert (answer.status_code, answer.json()["reason"]) == (200, "ok")
    assert (await both.same("POST", STATUS_CHECK_PATH, json={"call_id": "never-seen"}, headers=SECRET)).json()[
        "reason"
    ] == "unknown_call"
    envelope = status_update(call("live-1"), "in-progress")  # a Vapi envelope naming the call
    assert (await both.same("POST", STATUS_CHECK_PATH, content=envelope, headers=SECRET)).status_code == 200
    bearer = {"Authorization": f"Bearer {WEBHOOK_SECRET}"}
    assert (await both.same("POST", STATUS_CHECK_PATH, json={"call_id": "live-1"}, headers=bearer)).status_code == 200


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({"X-Vapi-Secret": "wrong"}, b'{"call_id": "live-1"}', 401, "unauthorized"),
        ({"X-Vapi-Secret": WEBHOOK_SECRET[:-1]}, b'{"call_id": "live-1"}', 401, "unauthorized"),
        ({}, b'{"call_id": "live-1"}', 401, "unauthorized"),
        ({"Authorization": "Bearer wrong"}, b'{"call_id": "live-1"}', 401, "unauthorized"),
        (SECRET, b'{"call_id": ', 400, "invalid_json"),
        (SECRET, b"", 400, "invalid_json"),
        (SECRET, b"[]", 422, "invalid_field"),
        (SECRET, b'{"call_id": ""}', 422, "invalid_field"),
        (SECRET, b'{"call_id": "has space"}', 422, "invalid_field"),
        (SECRET, b'{"message": 1}', 400, "invalid_request"),
        (SECRET, b'{"call_id": "' + b"x" * BODY_MAX + b'"}', 413, "body_too_large"),
    ],
)
async def test_status_check_refusals_match(
    both: Both, headers: dict[str, str], body: bytes, status: int, code: str
) -> None:
    answer = await both.same("POST", STATUS_CHECK_PATH, content=body, headers=headers)
    assert (answer.status_code, answer.json()["error"]["code"]) == (status, code)
    if status == 401:
        assert answer.headers["www-authenticate"] == "Bearer"


async def test_webhook_answers_and_refusals_match(both: Both) -> None:
    await both.live_call("live-2")
    ended = status_update(call("live-2"), "ended")
    assert (await both.same("POST", WEBHOOK_PATH, content=ended, headers=SECRET)).json() == {}
    assert (await both.same("POST", WEBHOOK_PATH, content=b'{"message":{"type":"hang"}}', headers=SECRET)).json() == {}
    assert (await both.same("POST", WEBHOOK_PATH, content=b"{}", headers=SECRET)).status_code == 400
    assert (await both.same("POST", WEBHOOK_PATH, content=ended, headers={"X-Vapi-Secret": "no"})).status_code == 401
    too_big = b'{"message":{"type":"hang","pad":"' + b"x" * BODY_MAX + b'"}}'
    assert (await both.same("POST", WEBHOOK_PATH, content=too_big, headers=SECRET)).status_code == 413


async def test_a_chunked_body_is_counted_against_the_limit(both: Both) -> None:
    async def chunks(size: int) -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        yield b'{"call_id": "'
        yield b"x" * size
        yield b'"}'

    over = await both.same_of("POST", STATUS_CHECK_PATH, lambda: {"content": chunks(BODY_MAX), "headers": SECRET})
    assert over.status_code == 413
    within = await both.same_of("POST", STATUS_CHECK_PATH, lambda: {"content": chunks(10), "headers": SECRET})
    assert within.json()["reason"] == "unknown_call"


async def test_an_unreadable_content_length_is_refused(both: Both) -> None:
    answers = []
    for asgi in (both.app, starlette_only(both.app)):
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b'{"call_id": "c"}', "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": STATUS_CHECK_PATH,
            "raw_path": STATUS_CHECK_PATH.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-length", b"12x"), (b"x-vapi-secret", WEBHOOK_SECRET.encode())],
            "client": ("127.0.0.1", 1),
            "server": ("credit-engine.test", 80),
        }
        await asgi(scope, receive, send)
        answers.append(sent)
    assert answers[0] == answers[1]
    assert answers[0][0]["status"] == 413


async def test_errors_are_mapped_as_starlette_maps_them(both: Both, monkeypatch: pytest.MonkeyPatch) -> None:
    await both.live_call("live-3")

    async def redis_away(*args: Any, **kwargs: Any) -> Any:
        raise RedisConnectionError("gone")

    monkeypatch.setattr(vapi_module, "check_call", redis_away)
    down = await both.same("POST", STATUS_CHECK_PATH, json={"call_id": "live-3"}, headers=SECRET)
    assert (down.status_code, down.headers["retry-after"], down.json()["error"]["code"]) == (503, "1", "unavailable")

    async def store_bound(*args: Any, **kwargs: Any) -> Any:
        raise TimeoutError  # a store's own bound (engine/db.py `bounded`), not the request's budget

    monkeypatch.setattr(vapi_module, "check_call", store_bound)
    bounded = await both.same("POST", STATUS_CHECK_PATH, json={"call_id": "live-3"}, headers=SECRET)
    assert (bounded.status_code, bounded.json()["error"]["code"]) == (503, "unavailable")

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(vapi_module, "check_call", broken)
    crashed = await both.same("POST", STATUS_CHECK_PATH, json={"call_id": "live-3"}, headers=SECRET)
    assert (crashed.status_code, crashed.json()["error"]["code"]) == (500, "internal_error")


async def test_a_crash_is_raised_on_to_the_server_after_its_500(both: Both, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(body: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(vapi_module, "_call_id_of", broken)
    strict = httpx.AsyncClient(transport=httpx.ASGITransport(app=both.app), base_url="http://credit-engine.test")
    async with strict:
        with pytest.raises(RuntimeError, match="a bug"):
            await strict.post(STATUS_CHECK_PATH, json={"call_id": "c"}, headers=SECRET)


async def test_the_request_budget_holds_on_the_lane(both: Both, monkeypatch: pytest.MonkeyPatch) -> None:
    async def stuck(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(5)

    await both.live_call("live-4")
    monkeypatch.setattr(vapi_module, "check_call", stuck)
    monkeypatch.setattr(app_module, "request_budget_s", 0.05)
    late = await both.same("POST", STATUS_CHECK_PATH, json={"call_id": "live-4"}, headers=SECRET)
    assert (late.status_code, late.json()["error"]["code"]) == (504, "timeout")


async def test_the_lane_counts_what_the_route_counted(both: Both) -> None:
    await both.live_call("live-5")
    registry = both.app.state.ctx.metrics.registry

    def counts() -> tuple[float, float]:
        latency = registry.get_sample_value("credit_engine_request_seconds_count", {"endpoint": "status_check"})
        decisions = registry.get_sample_value(
            "credit_engine_decisions_total", {"operation": "status_check", "outcome": "ok"}
        )
        return latency or 0.0, decisions or 0.0

    before = counts()
    for _ in range(3):
        assert (await both.lane.post(STATUS_CHECK_PATH, json={"call_id": "live-5"}, headers=SECRET)).status_code == 200
    assert counts() == (before[0] + 3, before[1] + 3)
    await both.lane.post(STATUS_CHECK_PATH, json={"call_id": ""}, headers=SECRET)  # refused: timed, not decided
    assert counts() == (before[0] + 4, before[1] + 3)


async def test_the_budget_cancels_the_request_and_knows_the_cancellation_for_its_own() -> None:
    budget = Budget(0.01)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(5)
    budget.close()
    assert (budget.expired, budget.ours) == (True, True)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # its cancellation spent: the task goes on
    await asyncio.sleep(0)


@pytest.mark.parametrize(("budget_s", "expired"), [(0.05, True), (5.0, False)])
async def test_a_cancellation_from_outside_is_never_the_budgets(budget_s: float, expired: bool) -> None:
    """Cancelled from outside (a server shutting down), the request is still busy when its budget
    runs out, or is done long before: either way the cancellation is not the budget's to answer."""
    budgets: list[Budget] = []

    async def request() -> None:
        budget = Budget(budget_s)
        budgets.append(budget)
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            await asyncio.shield(asyncio.sleep(0.2))
            raise
        finally:
            budget.close()

    task = asyncio.create_task(request())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (budgets[0].expired, budgets[0].ours) == (expired, False)
