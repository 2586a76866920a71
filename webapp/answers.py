"""The one table from the engine's outcomes to HTTP answers.

The engine returns outcomes (a script's `Outcome`, a purchase's `Provided`, a claim's `Claim`);
it never builds an HTTP status or body. This table says what each outcome of each operation
answers: the status, the error code and its message (formatted from the result's fields), and the
result fields an error body carries. Looked up in this order: the operation's own row for the
outcome, the operation's row for any other outcome (`(operation, ANY)`), the row for every
operation (`(ANY, outcome)`). A claimed request's replay is answered from the same table, so the
first answer and every replay of it are one mapping of one stored result
(engine/idempotent_requests.py).
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, TypeVar

from starlette.responses import Response

from credit_engine.engine import idempotent_requests as claims
from credit_engine.engine.results import Money
from credit_engine.webapp.responses import ApiError, json_response

R = TypeVar("R", bound=claims.Result)
ANY = "*"
REPLAYED = {"Idempotent-Replayed": "true"}


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str  # str.format over the result's fields
    details: Mapping[str, str] = field(default_factory=dict)  # error body field -> result field
    field: str | None = None  # the request field the refusal is about


RESTORING = Refusal(503, "state_restoring", "this account is being restored; retry shortly")
KEY_REUSED = "idempotency_key_reused"

# (operation, outcome name) -> the refusal. An outcome an operation succeeds with is not here.
REFUSALS: dict[tuple[str, str], Refusal] = {
    # Any claimed request (engine/idempotent_requests.Claim).
    (ANY, claims.Claim.conflict.value): Refusal(
        422, KEY_REUSED, "this Idempotency-Key was used with a different request body"
    ),
    (ANY, claims.Claim.in_progress.value): Refusal(
        409, "request_in_progress", "a request with this Idempotency-Key is still running; retry shortly"
    ),
    # Any money decision (engine/results.Outcome).
    (ANY, "org_unknown"): RESTORING,
    (ANY, "outbox_full"): Refusal(503, "ledger_backlog", "the ledger is behind; no new charges until it catches up"),
    # Buying a phone number (engine/provisioning.Provided).
    ("provision", "insufficient_funds"): Refusal(
        402,
        "insufficient_balance",
        "a phone number costs {price_pence} pence; {available_pence} pence is available",
        {"required_pence": "price_pence", "available_pence": "available_pence"},
    ),
    ("provision", "idempotency_conflict"): Refusal(
        422, KEY_REUSED, "this Idempotency-Key was used for a different charge"
    ),
    ("provision", "provider_failed"): Refusal(
        502,
        "provider_failed",
        "the telephony provider could not supply a number; the charge was refunded",
        {"refunded_pence": "price_pence", "refund_transaction_id": "refund_transaction_id"},
    ),
    # An admin's top-up (engine/credits.credit).
    ("topup", "idempotency_conflict"): Refusal(422, KEY_REUSED, "this Idempotency-Key was used for another amount"),
    # Reserving credit for an outbound call (engine/holds.reserve_call).
    ("reserve", "insufficient_funds"): Refusal(
        402, "insufficient_balance", "not enough credit to start a call: {available_pence} pence available"
    ),
    ("reserve", "too_many_calls"): Refusal(409, "too_many_calls", "the org is at its limit of concurrent calls"),
    ("reserve", "call_already_resolved"): Refusal(
        409, "call_already_resolved", "this call has already ended and been billed", field="call_id"
    ),
    ("reserve", ANY): Refusal(503, "unavailable", "cannot reserve now ({outcome}); retry shortly"),
    # Placing an outbound call through the engine (engine/dial.Dialled).
    ("dial", "phone_number_unknown"): Refusal(
        404, "not_found", "no active phone number with this id is registered to this org", field="phone_number_id"
    ),
    ("dial", "insufficient_funds"): Refusal(
        402,
        "insufficient_balance",
        "not enough credit to start a call: {available_pence} pence available",
        {"available_pence": "available_pence"},
    ),
    ("dial", "too_many_calls"): Refusal(429, "too_many_calls", "the org is at its limit of concurrent calls"),
    ("dial", "vapi_refused"): Refusal(
        502,
        "vapi_refused",
        "Vapi did not place the call ({reason}); the credit held for it was released",
        {"vapi_status": "vapi_status"},
    ),
    ("dial", "vapi_no_answer"): Refusal(
        504,
        "vapi_no_answer",
        "Vapi did not say whether it placed the call ({reason}); the credit stays held until the call "
        "reports (then it is billed as usual) or its hold expires; this key will not place another call",
        {"reservation_id": "reservation_id"},
    ),
}


def outcome_name(outcome: Enum) -> str:
    return outcome.name if isinstance(outcome.value, int) else str(outcome.value)


def refusal(operation: str, outcome: Enum) -> Refusal | None:
    """The table's row for this outcome of this operation: its own, else the operation's row for
    any other outcome, else every operation's. None: the operation succeeded."""
    name = outcome_name(outcome)
    return REFUSALS.get((operation, name)) or REFUSALS.get((operation, ANY)) or REFUSALS.get((ANY, name))


def _fields_of(result: Any) -> dict[str, Any]:
    values = {f.name: getattr(result, f.name) for f in fields(result)} if is_dataclass(result) else {}
    money = getattr(result, "money", None)
    if isinstance(money, Money):
        values.setdefault("available_pence", money.available_pence)
    return values


def error(row: Refusal, values: dict[str, Any] | None = None) -> ApiError:
    values = values or {}
    details = {name: values[source] for name, source in row.details.items()}
    return ApiError(row.status, row.code, row.message.format(**values), field=row.field, details=details)


def refused(operation: str, outcome: Enum, result: Any = None) -> ApiError | None:
    """The ApiError answering this outcome, or None when it is a success."""
    row = refusal(operation, outcome)
    if row is None:
        return None
    return error(row, {**_fields_of(result), "outcome": outcome_name(outcome)})


@dataclass(frozen=True)
class Answered:
    response: Response
    label: str  # for the decisions metric: the error code, or the status of a success


def claimed(
    operation: str, once: claims.Once[R], success: Callable[[R], dict[str, Any]], status: int = 201
) -> Answered:
    """The answer to a request run under its Idempotency-Key: the same for its first run and for
    every replay (which also says `Idempotent-Replayed: true`)."""
    headers = REPLAYED if once.claim == claims.Claim.replay else None
    if once.legacy is not None:  # stored by a release before results were kept: verbatim
        legacy_error = once.legacy.body.get("error")
        label = legacy_error["code"] if isinstance(legacy_error, dict) else str(once.legacy.status)
        return Answered(json_response(once.legacy.body, once.legacy.status, headers=REPLAYED), label)
    refusing = (
        refused(operation, once.claim) if once.result is None else refused(operation, once.result.outcome, once.result)
    )
    if refusing is not None:
        return Answered(refusing.response(headers), refusing.code)
    assert once.result is not None
    return Answered(json_response(success(once.result), status, headers=headers), str(status))
