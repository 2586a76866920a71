"""The one table from outcomes to HTTP (webapp/answers.py): every outcome an operation can end
with is either its success or a refusal with a 4xx/5xx, and every message formats from the
result the engine returns."""

import orjson
import pytest

from credit_engine.engine.credits import TOP_UP, TopUp
from credit_engine.engine.dial import OPERATION as DIAL
from credit_engine.engine.dial import Dial, Dialled
from credit_engine.engine.holds import Reservation
from credit_engine.engine.idempotent_requests import Claim
from credit_engine.engine.provisioning import OPERATION, Provided, Provision
from credit_engine.engine.results import Money, Outcome
from credit_engine.webapp import answers

MONEY = Money(balance_pence=120, held_pence=20, available_pence=100, debt_pence=0, seq=7)


@pytest.mark.parametrize("outcome", list(Provided))
def test_every_purchase_outcome_is_answered(outcome: Provided) -> None:
    result = Provision(outcome, 1000, available_pence=40, refund_transaction_id=9)
    error = answers.refused(OPERATION, outcome, result)
    if outcome == Provided.bought:
        assert error is None
        return
    assert error is not None and 400 <= error.status_code < 600
    assert "{" not in error.message
    assert result.kept() == (outcome == Provided.provider_failed)  # a refusal that is kept is the failure


def test_a_purchase_refusal_says_the_price_and_what_was_available() -> None:
    error = answers.refused(
        OPERATION, Provided.insufficient_funds, Provision(Provided.insufficient_funds, 1000, available_pence=40)
    )
    assert error is not None
    assert (error.status_code, error.code, error.details) == (
        402,
        "insufficient_balance",
        {"required_pence": 1000, "available_pence": 40},
    )
    assert error.message == "a phone number costs 1000 pence; 40 pence is available"


@pytest.mark.parametrize("outcome", list(Outcome))
def test_every_reservation_outcome_is_a_success_or_a_refusal(outcome: Outcome) -> None:
    reservation = Reservation(outcome, MONEY, 0, 0)
    error = answers.refused("reserve", outcome, reservation)
    if outcome in (Outcome.ok, Outcome.replayed):
        return  # the handler answers these 201 before asking the table
    assert error is not None and error.status_code in (402, 409, 503)
    assert "{" not in error.message


@pytest.mark.parametrize("outcome", [Outcome.org_unknown, Outcome.outbox_full, Outcome.not_expired])
def test_a_reservation_the_engine_cannot_make_now_is_unavailable(outcome: Outcome) -> None:
    """The reserve endpoint's own row for any other outcome wins over every operation's rows
    (a purchase answers outbox_full as ledger_backlog, a reservation as unavailable)."""
    error = answers.refused("reserve", outcome, Reservation(outcome, MONEY, 0, 0))
    assert error is not None
    assert (error.status_code, error.code, error.message) == (
        503,
        "unavailable",
        f"cannot reserve now ({outcome.name}); retry shortly",
    )
    purchase = answers.refused(OPERATION, Provided.outbox_full, Provision(Provided.outbox_full, 1))
    assert purchase is not None and purchase.code == "ledger_backlog"


def test_a_reservation_refusal_says_what_was_available() -> None:
    error = answers.refused("reserve", Outcome.insufficient_funds, Reservation(Outcome.insufficient_funds, MONEY, 0, 0))
    assert error is not None and error.message == "not enough credit to start a call: 100 pence available"


@pytest.mark.parametrize("claim", list(Claim))
def test_a_claim_that_did_not_run_is_refused_the_same_way_for_every_operation(claim: Claim) -> None:
    answered = [answers.refusal(operation, claim) for operation in (OPERATION, TOP_UP)]
    if claim in (Claim.new, Claim.replay):
        assert answered == [None, None]
    else:
        assert answered[0] == answered[1] is not None


def test_a_top_up_refused_for_another_amount() -> None:
    result = TopUp(Outcome.idempotency_conflict, 3, None, None, False)
    error = answers.refused(TOP_UP, result.outcome, result)
    assert error is not None and (error.status_code, error.code) == (422, "idempotency_key_reused")
    assert not result.kept()
    for outcome in (Outcome.ok, Outcome.replayed):
        assert answers.refused(TOP_UP, outcome, TopUp(outcome, 3, 10, 10, True)) is None


def test_results_survive_their_record() -> None:
    """What a claim keeps decodes to the same result, so a replay answers what the first run did."""
    bought = Provision(Provided.bought, 1000, {"id": "pn", "number": "+1", "status": "active"}, 4000)
    assert Provision.from_record(orjson.loads(orjson.dumps(bought.record()))) == bought
    topped = TopUp(Outcome.ok, 3, 10, None, False)
    assert TopUp.from_record(orjson.loads(orjson.dumps(topped.record()))) == topped


@pytest.mark.parametrize("outcome", list(Dialled))
def test_every_dial_outcome_is_answered(outcome: Dialled) -> None:
    """A placed call is the success; every refusal is a 4xx/5xx, and only Vapi's answers (or its
    silence) are kept for the key, because only they asked Vapi."""
    result = Dial(outcome, "ce-dial-" + "0" * 48, vapi_status=400, reason="no", available_pence=5)
    error = answers.refused(DIAL, outcome, result)
    if outcome == Dialled.placed:
        assert error is None
        return
    assert error is not None and 400 <= error.status_code < 600
    assert "{" not in error.message
    assert result.kept() == (outcome in (Dialled.vapi_refused, Dialled.vapi_no_answer))
    statuses = {Dialled.insufficient_funds: 402, Dialled.too_many_calls: 429, Dialled.vapi_refused: 502}
    if outcome in statuses:
        assert error.status_code == statuses[outcome]


def test_a_dial_record_round_trips_without_the_control_url() -> None:
    placed = Dial(Dialled.placed, "ce-dial-" + "1" * 48, "call-1", 60, 90, "queued", control_url="https://x/c")
    assert "control_url" not in placed.record()
    assert Dial.from_record(orjson.loads(orjson.dumps(placed.record()))) == placed
