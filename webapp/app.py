"""Builds the Starlette app. The lifespan owns the pools: it opens Redis and Postgres, rebuilds
Redis from Postgres if it lost its state (before any traffic), and keeps watching for that."""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from credit_engine.engine.call_index import CallIndex
from credit_engine.engine.call_server import STATUS_CHECK_PATH, WEBHOOK_PATH
from credit_engine.engine.clock import Clock
from credit_engine.engine.config import Settings
from credit_engine.engine.errors import InvalidInput, OrgNotFound
from credit_engine.engine.forwarding import AssistantServers, Forwarder
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.telephony import Telephony, VapiTelephony, make_telephony
from credit_engine.webapp import admin, alerts_api, dial, health, managed_telephony, vapi, wallet
from credit_engine.webapp.context import AppContext
from credit_engine.webapp.hot_lane import HotLane
from credit_engine.webapp.metrics import Metrics
from credit_engine.webapp.middleware import BodyLimit, BodySizeLimit
from credit_engine.webapp.openapi import openapi_document
from credit_engine.webapp.responses import ApiError, error_response, json_response
from credit_engine.webapp.state import StateGuard

log = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]


# Every request is bounded as a whole (Redis commands have no timeout of their own in the web
# app: see engine.runtime.redis_client). Vapi's webhook handlers have tighter budgets inside.
request_budget_s = 20.0


class Budget:
    """A request's deadline: asyncio.timeout's work (cancel the request's task when due, and tell
    that cancellation from anyone else's) with one timer handle and no context manager, which
    costs a third less on every request. `close` once the endpoint is done."""

    __slots__ = ("task", "cancelling", "handle", "expired", "ours")

    def __init__(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        self.task = task
        self.cancelling = task.cancelling()
        self.expired = False  # the deadline came, and cancelled the task
        self.ours = False  # ... and the task's cancellation is the deadline's alone
        self.handle = loop.call_at(loop.time() + seconds, self._expire)

    def _expire(self) -> None:
        self.expired = True
        self.task.cancel()

    def close(self) -> None:
        self.handle.cancel()
        if self.expired:
            self.ours = self.task.uncancel() <= self.cancelling


def timed(name: str, endpoint: Endpoint) -> Endpoint:
    async def measured(request: Request) -> Response:
        started = time.perf_counter()
        budget = Budget(request_budget_s)
        try:
            try:
                return await endpoint(request)
            finally:
                budget.close()
        except (TimeoutError, asyncio.CancelledError) as error:
            if not budget.expired or (isinstance(error, asyncio.CancelledError) and not budget.ours):
                # A store's own bound (engine/db.py `bounded`): unreachable, a 503 (on_backend_down);
                # or the request cancelled from outside (the server shutting down): not ours to answer.
                raise
            log.error("%s took longer than %.0fs: answered 504", name, request_budget_s)
            return error_response(
                504,
                "timeout",
                "the request took too long; it is safe to retry (with the same Idempotency-Key, where it has one)",
            )
        finally:
            request.app.state.ctx.metrics.observe_latency(name, time.perf_counter() - started)

    return measured


def route(path: str, endpoint: Endpoint, method: str, name: str) -> Route:
    return Route(path, timed(name, endpoint), methods=[method], name=name)


async def openapi(request: Request) -> Response:
    return json_response(openapi_document())


ROUTES = [
    route("/healthz", health.healthz, "GET", "healthz"),
    route("/readyz", health.readyz, "GET", "readyz"),
    route("/metrics", health.metrics, "GET", "metrics"),
    route("/openapi.json", openapi, "GET", "openapi"),
    route("/api/admin/orgs", admin.create, "POST", "admin_org_create"),
    route("/api/admin/orgs/{org_id}", admin.show, "GET", "admin_org_show"),
    route("/api/admin/orgs/{org_id}", admin.change, "PATCH", "admin_org_change"),
    route("/api/admin/orgs/{org_id}/api-keys", admin.new_api_key, "POST", "admin_api_key_create"),
    route("/api/admin/orgs/{org_id}/api-keys/{key_id}", admin.revoke, "DELETE", "admin_api_key_revoke"),
    route("/api/admin/orgs/{org_id}/topups", admin.topup, "POST", "admin_topup"),
    route("/api/admin/phone-numbers", admin.register_phone_number, "POST", "admin_phone_number_register"),
    route("/api/wallet", wallet.show_wallet, "GET", "wallet"),
    route("/api/wallet/transactions", wallet.transactions, "GET", "wallet_transactions"),
    route("/api/wallet/holds", wallet.holds, "GET", "wallet_holds"),
    route("/api/alerts", alerts_api.list_alerts, "GET", "alerts"),
    route("/api/alerts/signing-secret", alerts_api.signing_secret, "GET", "alerts_signing_secret"),
    route("/api/forwarding/secret", wallet.forwarding_secret, "GET", "forwarding_secret"),
    route("/api/calls", dial.place_call, "POST", "call_place"),
    route("/api/calls/{call_id}", wallet.show_call, "GET", "call_show"),
    route("/api/calls/{call_id}/reserve", wallet.reserve, "POST", "call_reserve"),
    route("/api/managed-telephony/pricing", managed_telephony.pricing, "GET", "pricing"),
    route("/api/managed-telephony/provision", managed_telephony.provision_number, "POST", "provision"),
    route(WEBHOOK_PATH, vapi.webhook, "POST", "vapi_webhook"),
    route(STATUS_CHECK_PATH, vapi.status_check, "POST", "status_check"),
]


# Vapi's two endpoints, most of the traffic: served by the hot lane (webapp/hot_lane.py).
HOT_ROUTES = ("vapi_webhook", "status_check")


class CreditEngineApp(Starlette):
    """Starlette, with the hot lane in front of its middleware stack: the lane serves the hot
    routes' endpoints (as `timed` wraps them) with the app's own body limit and exception handlers."""

    def __init__(self, *, body_limit: BodyLimit, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.body_limit = body_limit

    def build_middleware_stack(self) -> ASGIApp:
        hot = {r.path: r.endpoint for r in self.routes if isinstance(r, Route) and r.name in HOT_ROUTES}
        assert len(hot) == len(HOT_ROUTES), hot
        return HotLane(super().build_middleware_stack(), hot, self.exception_handlers, self.body_limit)


async def on_api_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, ApiError)
    return error.response()


async def on_invalid_input(request: Request, error: Exception) -> Response:
    assert isinstance(error, InvalidInput)
    return error_response(422, "invalid_field", error.message, field=error.field)


async def on_org_not_found(request: Request, error: Exception) -> Response:
    return error_response(404, "not_found", "no such org")


async def on_http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_response(error.status_code, codes.get(error.status_code, "http_error"), str(error.detail))


# A store that cannot be reached is an outage, not a bug: 503 and a retry, never a 500.
BACKEND_DOWN = (
    RedisConnectionError,
    RedisTimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    ConnectionError,
    TimeoutError,
)


async def on_backend_down(request: Request, error: Exception) -> Response:
    log.warning(
        "%s %s: a store is unreachable (%s: %s); answered 503",
        request.method,
        request.url.path,
        type(error).__name__,
        error,
    )
    return error_response(
        503,
        "unavailable",
        "Redis or Postgres is unreachable for a moment; retry shortly "
        "(with the same Idempotency-Key, where it has one)",
        headers={"Retry-After": "1"},
    )


async def on_crash(request: Request, error: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(
        500,
        "internal_error",
        "something went wrong on our side; it is safe to retry (with the same Idempotency-Key, where it has one)",
    )


guard_stop_timeout_s = 5.0


def create_app(
    settings: Settings | None = None, *, clock: Clock | None = None, telephony: Telephony | None = None
) -> CreditEngineApp:
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        rt = await Runtime.open(settings, clock=clock, redis_socket_timeout_s=None)
        guard = StateGuard(rt)
        await guard.start()  # rebuild Redis from Postgres before taking any traffic
        provider = telephony or make_telephony(settings)
        metrics = Metrics()
        forwarder = Forwarder(settings, count=metrics.forward)
        assistant_servers = AssistantServers(settings)
        app.state.ctx = AppContext(settings, rt, guard, provider, metrics, CallIndex(rt), forwarder, assistant_servers)
        forwarder.start()
        watcher = asyncio.create_task(guard.watch_forever(), name="redis-state-watch")
        try:
            yield
        finally:
            await forwarder.close()
            await assistant_servers.aclose()
            guard.stop()
            try:
                await asyncio.wait_for(watcher, guard_stop_timeout_s)
            except (TimeoutError, asyncio.CancelledError):  # stuck on a store that does not answer
                watcher.cancel()
            if isinstance(provider, VapiTelephony) and telephony is None:
                await provider.close()
            await rt.close()

    body_limit = BodyLimit(
        bytes_max=settings.api_body_bytes_max,
        large_prefix="/api/vapi/",
        large_bytes_max=settings.webhook_body_bytes_max,
    )
    return CreditEngineApp(
        body_limit=body_limit,
        routes=ROUTES,
        middleware=[Middleware(BodySizeLimit, limit=body_limit)],
        exception_handlers={
            ApiError: on_api_error,
            InvalidInput: on_invalid_input,
            OrgNotFound: on_org_not_found,
            HTTPException: on_http_error,
            **{kind: on_backend_down for kind in BACKEND_DOWN},
            Exception: on_crash,
        },
        lifespan=lifespan,
    )
