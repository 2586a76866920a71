"""Vapi server messages built with Vapi's own SDK types (vapi_server_sdk), so the tests send
exactly what Vapi sends: field names, nesting and formats come from Vapi's schema, not from us."""

from datetime import UTC, datetime, timedelta
from typing import Any

from vapi.types import (
    Analysis,
    Artifact,
    AssistantOverrides,
    Call,
    CreateCustomerDto,
    Monitor,
    ServerMessageAssistantRequest,
    ServerMessageEndOfCallReport,
    ServerMessageStatusUpdate,
)

from credit_engine.engine.clock import ManualClock

# Calls are created when a ManualClock starts (engine/clock.py): a message replayed after the clock
# has moved on carries the call's original createdAt, as Vapi's would.
T0 = datetime.fromtimestamp(ManualClock().value_ms / 1000, UTC)


def call(
    call_id: str,
    *,
    phone_number_id: str | None = None,
    org_hint: str | None = None,
    control_url: str | None = None,
    started_at: datetime | None = None,
    ended_at: datetime | None = None,
    call_type: str = "inboundPhoneCall",
) -> Call:
    overrides = AssistantOverrides(variable_values={"org_id": org_hint}) if org_hint else None
    return Call(
        id=call_id,
        org_id="vapi-org-0001",  # Vapi's own org: the platform's account, not our tenant
        type=call_type,
        created_at=T0,
        updated_at=T0,
        phone_number_id=phone_number_id,
        customer=CreateCustomerDto(number="+15557654321"),
        monitor=Monitor(control_url=control_url) if control_url else None,
        assistant_overrides=overrides,
        started_at=started_at,
        ended_at=ended_at,
    )


def encode(message: Any) -> bytes:
    # The envelope is `{"message": ...}` (vapi.types.ServerMessage). Building it through the SDK's
    # ServerMessage union costs ~20 s of pydantic schema building per test process, so the
    # SDK-built message is wrapped by hand; the message itself is entirely the SDK's.
    return b'{"message":' + message.json().encode() + b"}"


def assistant_request(the_call: Call) -> bytes:
    return encode(ServerMessageAssistantRequest(type="assistant-request", call=the_call, timestamp=1.7e12))


def status_update(the_call: Call, status: str, ended_reason: str | None = None) -> bytes:
    return encode(
        ServerMessageStatusUpdate(type="status-update", status=status, call=the_call, ended_reason=ended_reason)
    )


def end_of_call_report(
    the_call: Call, seconds: float, *, cost_usd: float = 0.2134, at_message_level: bool = True
) -> bytes:
    started = T0
    ended = T0 + timedelta(seconds=seconds)
    if not at_message_level:
        the_call = the_call.model_copy(update={"started_at": started, "ended_at": ended})
    return encode(
        ServerMessageEndOfCallReport(
            type="end-of-call-report",
            ended_reason="customer-ended-call",
            call=the_call,
            artifact=Artifact(),
            analysis=Analysis(),
            cost=cost_usd,
            started_at=started if at_message_level else None,
            ended_at=ended if at_message_level else None,
        )
    )
