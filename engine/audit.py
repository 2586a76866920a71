"""Audit the ledger against Vapi's own list of calls (`credit-engine audit vapi`, the worker's daily run).

Vapi's calls created in a window (`GET /call`, paged by createdAt) are compared with how the engine
resolved each one, for the calls on numbers registered here (phone_numbers, any org, released
ones included) and any call the engine billed in the window. Three kinds of mismatch:

- `unbilled`: Vapi ran it (ended, with a duration above 0 s) and the engine never resolved it (no
  resolution, or a hold still live);
- `duration`: the engine billed seconds that differ from Vapi's by more than one second;
- `unknown_to_vapi`: the engine charged for a call resolved in the window that is not in Vapi's
  list and that `GET /call/{id}` does not find either (a call created before the window is found
  that way and compared like the others).

How the engine resolved a call is read from Redis first (its call-state record, the decision
itself, which the ledger may not have drained yet), then from Postgres's call_holds. Vapi's seconds
are what its end-of-call-report would bill (engine/vapi_calls.py); calls still running at Vapi are
counted, not compared.

`settle` bills what was never billed, at Vapi's seconds, through engine/holds.commit_call: the
call's own ledger key (`<org>/call/<call>/charge`, the internal `call` namespace of
engine/idempotency.py), the one its end-of-call-report and the settle job use. So a second run
bills nothing (the call is committed: a replay), and a report that turns up later is a replay too.
A call that the engine expired or released at other seconds is committed the same way, as a late
report would be (the difference, under `<org>/call/<call>/adjust`). A committed call whose seconds
differ, and a call Vapi does not know, are for an operator: reported, never changed.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from credit_engine.engine import limits
from credit_engine.engine.decisions import restoring
from credit_engine.engine.holds import commit_call
from credit_engine.engine.idempotency import audit_alert_key, call_state_key
from credit_engine.engine.records import CallState
from credit_engine.engine.results import Outcome
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.vapi_account import VapiAccount, VapiError
from credit_engine.engine.vapi_calls import VapiCallRecord

log = logging.getLogger(__name__)

UNBILLED = "unbilled"
DURATION = "duration"
UNKNOWN_TO_VAPI = "unknown_to_vapi"
KINDS = (UNBILLED, DURATION, UNKNOWN_TO_VAPI)
seconds_tolerance = 1  # Vapi's seconds and ours may differ by this much (rounding of its timestamps)
state_page_size = 500  # calls per Redis pipeline and Postgres query

BILLED_IN_WINDOW_SQL = """
SELECT org_id, call_id FROM call_holds
WHERE status <> 'live' AND charged_pence > 0 AND resolved_at >= $1 AND resolved_at < $2
"""
STATES_SQL = """
SELECT h.org_id, h.call_id, h.status, h.charged_pence, h.billed_seconds
FROM unnest($1::text[], $2::text[]) AS u(org_id, call_id)
JOIN call_holds h ON h.org_id = u.org_id AND h.call_id = u.call_id
"""
OTHER_ORG_SQL = "SELECT DISTINCT org_id FROM ledger_entries WHERE call_id = $1 AND org_id <> $2 LIMIT 1"


@dataclass(frozen=True)
class Resolved:
    """How the engine resolved a call: 'live' (a hold, not resolved), committed, released, expired."""

    status: str
    billed_seconds: int
    charged_pence: int


@dataclass
class Mismatch:
    kind: str
    org_id: str
    call_id: str
    vapi_seconds: int | None  # None: Vapi does not know the call
    billed_seconds: int | None  # None: the engine never resolved it
    status: str | None  # how the engine resolved it
    settled: bool = False
    settled_pence: int = 0


@dataclass
class OrgSummary:
    calls: int = 0
    unbilled: int = 0
    duration: int = 0
    unknown_to_vapi: int = 0
    settled: int = 0
    settled_pence: int = 0


@dataclass
class AuditReport:
    since: datetime
    until: datetime
    vapi_calls: int = 0  # listed by Vapi in the window
    compared: int = 0  # of them, on numbers registered here or billed here, and ended
    running: int = 0  # not ended at Vapi yet: not compared
    mismatches: list[Mismatch] = field(default_factory=list)
    orgs: dict[str, OrgSummary] = field(default_factory=dict)

    @property
    def unsettled(self) -> list[Mismatch]:
        return [m for m in self.mismatches if not m.settled]

    @property
    def ok(self) -> bool:
        """Nothing left to fix: no mismatch, or every one settled by this run."""
        return not self.unsettled

    def org(self, org_id: str) -> OrgSummary:
        return self.orgs.setdefault(org_id, OrgSummary())

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "vapi_calls": self.vapi_calls,
            "compared": self.compared,
            "running": self.running,
            "mismatches": [asdict(m) for m in self.mismatches],
            "orgs": {org_id: asdict(summary) for org_id, summary in sorted(self.orgs.items())},
        }

    def table(self) -> str:
        lines = [_mismatch_line(m) for m in self.mismatches]
        lines += [_org_line(org_id, summary) for org_id, summary in sorted(self.orgs.items())]
        lines.append(
            f"{self.vapi_calls} calls at Vapi from {self.since.isoformat()} to {self.until.isoformat()}: "
            f"{self.compared} compared, {self.running} still running, {len(self.mismatches)} mismatched, "
            f"{len(self.mismatches) - len(self.unsettled)} settled"
        )
        return "\n".join(lines)


def _mismatch_line(m: Mismatch) -> str:
    what = {
        UNBILLED: f"Vapi ran it {m.vapi_seconds} s, never billed here",
        DURATION: f"billed {m.billed_seconds} s ({m.status}), Vapi says {m.vapi_seconds} s",
        UNKNOWN_TO_VAPI: f"billed {m.billed_seconds} s ({m.status}), Vapi does not know it",
    }[m.kind]
    fixed = f": settled, {m.settled_pence}p" if m.settled else ""
    return f"{'✓' if m.settled else '✗'} {m.kind:<15} {m.org_id}  {m.call_id}  {what}{fixed}"


def _org_line(org_id: str, s: OrgSummary) -> str:
    return (
        f"  {org_id}: {s.calls} calls, {s.unbilled} unbilled, {s.duration} with other seconds, "
        f"{s.unknown_to_vapi} unknown to Vapi, {s.settled} settled ({s.settled_pence}p)"
    )


Progress = Callable[[int, int, int], None]


async def audit_vapi(
    rt: Runtime,
    account: VapiAccount,
    since: datetime,
    until: datetime,
    *,
    settle: bool = False,
    on_page: Callable[[int, int], None] | None = None,
    progress: Progress | None = None,
) -> AuditReport:
    report = AuditReport(since, until)
    calls = await account.list_calls(since, until, on_page=on_page)
    report.vapi_calls = len(calls)
    numbers = {row["vapi_phone_number_id"]: row["org_id"] for row in await rt.pg.fetch(NUMBERS_SQL)}
    billed = {row["call_id"]: row["org_id"] for row in await rt.pg.fetch(BILLED_IN_WINDOW_SQL, since, until)}
    ours = [(billed.get(c.id) or numbers[c.phone_number_id or ""], c) for c in calls if _ours(c, numbers, billed)]
    listed = {c.id for c in calls}
    missing = [(org_id, call_id) for call_id, org_id in billed.items() if call_id not in listed]
    if len(missing) > limits.audit_unknown_lookups_max:
        raise VapiError(
            "auditing against Vapi", None, f"{len(missing)} billed calls are not in Vapi's list: narrow the window"
        )
    total = len(ours) + len(missing)
    for index in range(0, len(ours), state_page_size):
        await _compare_page(rt, report, ours[index : index + state_page_size], settle)
        _tick(progress, index + len(ours[index : index + state_page_size]), total, report)
    for done, (org_id, call_id) in enumerate(missing, start=len(ours) + 1):
        await _confirm_missing(rt, account, report, org_id, call_id, settle)
        _tick(progress, done, total, report)
    return report


NUMBERS_SQL = "SELECT vapi_phone_number_id, org_id FROM phone_numbers"


def _ours(call: VapiCallRecord, numbers: dict[str, str], billed: dict[str, str]) -> bool:
    return call.id in billed or (call.phone_number_id is not None and call.phone_number_id in numbers)


def _tick(progress: Progress | None, done: int, total: int, report: AuditReport) -> None:
    if progress is not None:
        progress(done, total, len(report.mismatches))


async def _compare_page(
    rt: Runtime, report: AuditReport, page: Sequence[tuple[str, VapiCallRecord]], settle: bool
) -> None:
    states = await resolutions(rt, [(org_id, call.id) for org_id, call in page])
    for org_id, call in page:
        await _compare(rt, report, org_id, call, states.get((org_id, call.id)), settle)


async def _compare(
    rt: Runtime, report: AuditReport, org_id: str, call: VapiCallRecord, state: Resolved | None, settle: bool
) -> None:
    if not call.ended:
        report.running += 1
        return
    if state is None:
        org_id, state = await _billed_elsewhere(rt, org_id, call.id)
    report.compared += 1
    report.org(org_id).calls += 1
    mismatch = classify(org_id, call, state)
    if mismatch is None:
        return
    if settle and _settleable(mismatch):
        await _settle(rt, mismatch, call)
    _record(report, mismatch)


def classify(org_id: str, call: VapiCallRecord, state: Resolved | None) -> Mismatch | None:
    """What is wrong with an ended call at Vapi as the engine resolved it; None if nothing."""
    vapi_seconds = call.billed_seconds or 0
    if state is None or state.status == "live":
        if vapi_seconds == 0:
            return None  # it never connected: nothing to bill
        return Mismatch(UNBILLED, org_id, call.id, vapi_seconds, None, None if state is None else "live")
    if abs(state.billed_seconds - vapi_seconds) <= seconds_tolerance:
        return None
    return Mismatch(DURATION, org_id, call.id, vapi_seconds, state.billed_seconds, state.status)


def _settleable(m: Mismatch) -> bool:
    return m.kind == UNBILLED or (m.kind == DURATION and m.status in ("expired", "released"))


async def _settle(rt: Runtime, m: Mismatch, call: VapiCallRecord) -> None:
    assert m.vapi_seconds is not None
    seconds, meta = m.vapi_seconds, call.meta("vapi_audit")
    resolution = await restoring(rt, m.org_id, lambda: commit_call(rt, m.org_id, m.call_id, seconds, meta=meta))
    # A replay settles an unbilled call (billed meanwhile), never a duration: the engine resolved
    # the call longer ago than Redis remembers, so it cannot be adjusted (for an operator).
    if resolution.outcome in (Outcome.ok, Outcome.adjusted) or (
        resolution.outcome == Outcome.replayed and m.kind == UNBILLED
    ):
        m.settled = True
        m.settled_pence = resolution.charged_pence if resolution.outcome != Outcome.replayed else 0
        log.warning(
            "audit: call %s of org %s billed at Vapi's %d s (%s): %dp",
            m.call_id,
            m.org_id,
            seconds,
            m.kind,
            m.settled_pence,
        )
    else:
        log.error("audit: call %s of org %s could not be settled: %s", m.call_id, m.org_id, resolution.outcome.name)


def _record(report: AuditReport, m: Mismatch) -> None:
    report.mismatches.append(m)
    summary = report.org(m.org_id)
    setattr(summary, m.kind, getattr(summary, m.kind) + 1)
    if m.settled:
        summary.settled += 1
        summary.settled_pence += m.settled_pence


async def _confirm_missing(
    rt: Runtime, account: VapiAccount, report: AuditReport, org_id: str, call_id: str, settle: bool
) -> None:
    """A call billed here in the window and absent from Vapi's list: Vapi may have created it before
    the window (then it is compared like any other) or not know it at all."""
    try:
        call = await account.call(call_id)
    except VapiError as error:
        if error.status is None or not 400 <= error.status < 500:
            raise  # Vapi cannot say now: the audit stops rather than guess
        call = None  # Vapi refuses the id itself (not one of its ids): it does not know the call
    if call is not None:
        states = await resolutions(rt, [(org_id, call_id)])
        await _compare(rt, report, org_id, call, states.get((org_id, call_id)), settle)
        return
    state = (await resolutions(rt, [(org_id, call_id)])).get((org_id, call_id))
    report.org(org_id).calls += 1
    _record(
        report,
        Mismatch(
            UNKNOWN_TO_VAPI,
            org_id,
            call_id,
            None,
            None if state is None else state.billed_seconds,
            None if state is None else state.status,
        ),
    )


async def _billed_elsewhere(rt: Runtime, org_id: str, call_id: str) -> tuple[str, Resolved | None]:
    """A call with no resolution under its number's org may have been billed to another (the
    number moved, or the call was admitted for another org): the ledger knows, by call id."""
    other = await rt.pg.fetchval(OTHER_ORG_SQL, call_id, org_id)
    if other is None:
        return org_id, None
    return str(other), (await resolutions(rt, [(str(other), call_id)])).get((str(other), call_id))


async def resolutions(rt: Runtime, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Resolved]:
    """How the engine resolved each (org, call): Redis's call-state record first (the decision,
    maybe not in the ledger yet), then a live hold in Redis, then Postgres's call_holds row."""
    found: dict[tuple[str, str], Resolved] = {}
    async with rt.redis.pipeline(transaction=False) as pipe:
        for org_id, call_id in pairs:
            pipe.hget(rt.keys.org(org_id).idem, call_state_key(org_id, call_id))
            pipe.hexists(rt.keys.org(org_id).holds, call_id)
        replies = await pipe.execute()
    for index, pair in enumerate(pairs):
        text, live = replies[2 * index], replies[2 * index + 1]
        if text is not None:
            state = CallState.decode(text.decode() if isinstance(text, bytes) else text)
            found[pair] = Resolved(state.status.value, state.billed_seconds, state.charged_pence)
        elif live:
            found[pair] = Resolved("live", 0, 0)
    rest = [pair for pair in pairs if pair not in found]
    if rest:
        rows = await rt.pg.fetch(STATES_SQL, [org for org, _ in rest], [call for _, call in rest])
        for row in rows:
            found[(row["org_id"], row["call_id"])] = Resolved(
                row["status"], row["billed_seconds"] or 0, row["charged_pence"] or 0
            )
    return found


ALERT_KIND = "vapi_audit_mismatch"


async def audit_previous_day(rt: Runtime, account: VapiAccount) -> AuditReport:
    """The worker's daily run: yesterday (UTC, by the money clock) audited, nothing settled, and
    one `vapi_audit_mismatch` alert per org with mismatches (keyed by org and day: a second run
    of the same day alerts nobody again), plus an ERROR line for the operator."""
    now = datetime.fromtimestamp(await rt.clock.now_ms(rt.redis) / 1000, tz=UTC)
    until = datetime(now.year, now.month, now.day, tzinfo=UTC)
    since = until - timedelta(days=1)
    report = await audit_vapi(rt, account, since, until)
    for org_id, found in _by_org(report.unsettled).items():
        await _alert(rt, org_id, since.date().isoformat(), found)
        log.error("audit: org %s has %d calls that disagree with Vapi on %s", org_id, len(found), since.date())
    return report


def _by_org(mismatches: Sequence[Mismatch]) -> dict[str, list[Mismatch]]:
    grouped: dict[str, list[Mismatch]] = {}
    for m in mismatches:
        grouped.setdefault(m.org_id, []).append(m)
    return grouped


async def _alert(rt: Runtime, org_id: str, day: str, found: Sequence[Mismatch]) -> None:
    payload = {
        "type": ALERT_KIND,
        "org_id": org_id,
        "day": day,
        **{kind: sum(m.kind == kind for m in found) for kind in KINDS},
        "call_ids": [m.call_id for m in found[: limits.audit_mismatches_alerted_max]],
    }
    await rt.pg.execute(
        """INSERT INTO alert_events (org_id, idempotency_key, kind, call_id, payload, created_at)
           VALUES ($1, $2, $3, NULL, $4::jsonb, now()) ON CONFLICT (idempotency_key) DO NOTHING""",
        org_id,
        audit_alert_key(org_id, day),
        ALERT_KIND,
        payload,
    )
