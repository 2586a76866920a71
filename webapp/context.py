"""What the endpoints share for the life of the process (built in the app's lifespan)."""

from dataclasses import dataclass

from starlette.requests import Request

from credit_engine.engine.call_index import CallIndex
from credit_engine.engine.config import Settings
from credit_engine.engine.forwarding import AssistantServers, Forwarder
from credit_engine.engine.restore import restore_org_if_absent
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.telephony import Telephony
from credit_engine.webapp.metrics import Metrics
from credit_engine.webapp.responses import ApiError
from credit_engine.webapp.state import StateGuard


@dataclass
class AppContext:
    settings: Settings
    rt: Runtime
    guard: StateGuard
    telephony: Telephony
    metrics: Metrics
    calls: CallIndex
    forwarder: Forwarder
    assistant_servers: AssistantServers

    def require_ready(self) -> None:
        """Money decisions wait while Redis is being rebuilt from Postgres."""
        if not self.guard.ready:
            raise ApiError(503, "state_restoring", "balances are being restored from the ledger; retry shortly")

    async def bring_org_in(self, org_id: str) -> bool:
        """Redis does not hold the org (a wallet read found nothing): restore it from Postgres if it
        exists there. Decisions go through engine/decisions.py `restoring` instead."""
        return await restore_org_if_absent(self.rt, org_id) is not None


def context(request: Request) -> AppContext:
    ctx = request.app.state.ctx
    assert isinstance(ctx, AppContext)
    return ctx
