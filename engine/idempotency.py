"""Idempotency keys: the three layers that stop a mutation happening twice, and every key
derivation, in one place.

1. HTTP claims (engine/idempotent_requests.py, Postgres `idempotent_requests`): (org, operation,
   the client's Idempotency-Key) -> the first response, replayed verbatim; kept forever.
2. Redis records (each org's `idem` hash): a ledger key or a call-state key -> the first outcome,
   checked by the scripts before they decide; kept CREDIT_ENGINE_IDEMPOTENCY_TTL_S.
3. Ledger keys (Postgres `ledger_entries.idempotency_key`, unique): kept forever, and asked
   before Redis wherever Redis may have forgotten (a purchase, rent, a top-up's replay, a report).

Beside the three layers, two more keys stop a side effect happening twice, derived here too:
alert keys (`alert_events.idempotency_key`: one signed alert per event) and the key a purchase
sends to the telephony provider. The scripts' balance alerts derive theirs in lua/_alerts.lua
(`alert:<org>:<kind>:…`), which cannot meet the ones here: an org id has neither ':' nor '/', so
these start `<org>/`.

A ledger key is `<org_id>/<namespace>/<suffix>`. A client's key only ever follows a *client*
namespace (CLIENT_NAMESPACES); every key the engine derives for itself lives in an *internal*
namespace (INTERNAL_NAMESPACES). Namespaces are fixed words without '/', and org ids cannot hold
'/', so the second segment alone tells the two apart: no client key, however it is spelled, can
equal a key the engine uses for rent, refunds, repayments or calls. (Before this rule, rent lived
under `asset` as `rent:<number>:<month>`, and a purchase keyed like that made rent skip a month:
those legacy keys are still recognised, by their meta, when rent asks whether a month is paid.)
"""

import hashlib

from credit_engine.engine import validate

CLIENT_NAMESPACES = frozenset({"asset", "topup"})
INTERNAL_NAMESPACES = frozenset({"rent", "refund", "repay", "call", "dial"})
assert not CLIENT_NAMESPACES & INTERNAL_NAMESPACES


def _ledger_key(org_id: str, namespace: str, suffix: str) -> str:
    assert "/" not in org_id
    assert namespace in CLIENT_NAMESPACES | INTERNAL_NAMESPACES
    assert suffix
    return f"{org_id}/{namespace}/{suffix}"


def client_ledger_key(org_id: str, namespace: str, idempotency_key: str) -> str:
    """The ledger key of a client's request (a purchase, a top-up) under its Idempotency-Key."""
    assert namespace in CLIENT_NAMESPACES
    validate.idempotency_key(idempotency_key)
    return _ledger_key(org_id, namespace, idempotency_key)


def rent_ledger_key(org_id: str, vapi_phone_number_id: str, month: str) -> str:
    """A number's rent for one month ('YYYY-MM'): at most one entry per number and month."""
    assert len(month) == 7 and month[4] == "-"
    return _ledger_key(org_id, "rent", f"{month}/{vapi_phone_number_id}")


def legacy_rent_ledger_key(org_id: str, vapi_phone_number_id: str, month: str) -> str:
    """Where releases before the internal namespaces kept rent (in the client namespace `asset`).
    Only an entry under it whose meta says `phone_number_rent` for this number and month is rent."""
    return f"{org_id}/asset/rent:{vapi_phone_number_id}:{month}"


def credit_ledger_key(org_id: str, kind: str, key: str) -> str:
    """A credit's ledger key: a top-up under the client's key, a refund under one the engine derived."""
    if kind == "topup":
        return client_ledger_key(org_id, "topup", key)
    assert kind == "refund"
    validate.idempotency_key(key)
    return _ledger_key(org_id, "refund", key)


def provision_refund_key(purchase_key: str) -> str:
    """The refund of a failed purchase (the suffix under `refund`): fixed length whatever the
    client's key, one per purchase."""
    return "provision:" + hashlib.sha256(purchase_key.encode()).hexdigest()


def repay_ledger_key(org_id: str, credit_ledger_key: str) -> str:
    """The debt repayment a credit may make when Redis applies it."""
    prefix = f"{org_id}/"
    assert credit_ledger_key.startswith(prefix)
    return _ledger_key(org_id, "repay", credit_ledger_key[len(prefix) :])


def call_ledger_key(org_id: str, call_id: str, phase: str) -> str:
    """A call's charge (`charge`) or a late report's difference (`adjust`). The one key a call is
    billed under, whoever bills it: its end-of-call-report, the settle job from Vapi's record
    (engine/settle.py) or `audit vapi --settle` (engine/audit.py), so that any two of them are a
    replay (or an adjustment), never two charges."""
    assert "/" not in call_id
    assert phase in ("charge", "adjust")
    return _ledger_key(org_id, "call", f"{call_id}/{phase}")


def call_state_key(org_id: str, call_id: str) -> str:
    """The Redis record of a call's resolution (commit, release or expiry); never a ledger key."""
    assert "/" not in call_id
    return _ledger_key(org_id, "call", call_id)


def call_state_prefix(org_id: str) -> str:
    """What every call-state key of the org starts with (the reconciler reads them by it)."""
    return f"{org_id}/call/"


# A call the engine places at Vapi (POST /api/calls, engine/dial.py) is held, until Vapi names
# it, under a reservation id of its own: a call id (engine/keys.CALL_ID_PATTERN) no Vapi call id
# has (Vapi's are UUIDs) and the reserve API refuses to take.
DIAL_RESERVATION_PREFIX = "ce-dial-"


def dial_reservation_id(org_id: str, idempotency_key: str) -> str:
    """The id the hold of a placed call is taken under before Vapi answers, one per client key:
    every attempt of one request reserves (and sends Vapi) the same id."""
    validate.idempotency_key(idempotency_key)
    digest = hashlib.sha256(f"{org_id}/{idempotency_key}".encode()).hexdigest()
    return DIAL_RESERVATION_PREFIX + digest[:48]


def is_dial_reservation_id(value: object) -> bool:
    return (
        isinstance(value, str)
        and value.startswith(DIAL_RESERVATION_PREFIX)
        and len(value) == len(DIAL_RESERVATION_PREFIX) + 48
        and all(c in "0123456789abcdef" for c in value[len(DIAL_RESERVATION_PREFIX) :])
    )


def dial_record_key(org_id: str, reservation_id: str) -> str:
    """The Redis record (the org's idem hash) of how a placed call's dial went: `dialling|<ms>`
    before Vapi is asked, `placed|<call_id>|<hold_pence>|<max_duration_s>` once Vapi's call id is
    adopted (lua/hold_adopt.lua), `refused|<status>` when Vapi refused. Never a ledger key."""
    assert is_dial_reservation_id(reservation_id)
    return _ledger_key(org_id, "dial", reservation_id)


def provider_purchase_key(org_id: str, purchase_key: str) -> str:
    """What a purchase sends the telephony provider as its idempotency key."""
    return f"{org_id}/{purchase_key}"


def end_call_failed_alert_key(org_id: str, call_id: str) -> str:
    """One alert per call the engine could not end."""
    return f"{org_id}/end_call_failed/{call_id}"


def rent_alert_key(org_id: str, kind: str, vapi_phone_number_id: str, month: str) -> str:
    """One alert of each rent kind (due, suspended, released) per number and month."""
    return f"{org_id}/{kind}/{vapi_phone_number_id}/{month}"


def audit_alert_key(org_id: str, day: str) -> str:
    """One `vapi_audit_mismatch` alert per org and audited day ('YYYY-MM-DD')."""
    assert len(day) == 10 and day[4] == "-" and day[7] == "-"
    return f"{org_id}/vapi_audit_mismatch/{day}"
