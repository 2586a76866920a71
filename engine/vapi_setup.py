"""Connecting a platform's Vapi account to the engine: `credit-engine vapi import` and `connect`.

Vapi asks a server which assistant answers a call (an assistant-request) only for a bare number,
one with no assistant, squad or workflow attached, and asks the number's server URL, else the
account's (vapi-contract.md §1, §2). A number with an assistant attached is answered by Vapi
without asking anyone, so its calls never meet the credit check. Hence:

- import: list the account's numbers and register each to an org, with the assistant attached
  at Vapi as the one the engine answers. A number registered already (to any org) is left exactly
  as it is (its assistant, a suspension for unpaid rent). A number with a squad or a workflow
  attached is not registered (the engine answers assistants only), nor a bare one with no
  assistant to answer (unless CREDIT_ENGINE_DEFAULT_ASSISTANT_ID is set).
- connect: make every registered number (not released) bare and name the engine as its server
  (engine/call_server.py's `engine_server`), sending only what differs, so a second run sends
  nothing. The assistant the engine must answer is recorded BEFORE the number is made bare (a
  bare number without one would refuse its calls as "not set up"): the registered one, else the
  one attached at Vapi, else the default. A number whose Vapi assistant differs from the
  registered one, that has a squad or a workflow, or that has no assistant at all is not touched.

`vapi check` (engine/vapi_check.py) reports the same rules as ticks and crosses. Pure functions
decide (`import_plan`, `connect_plan`, `server_problems`); the async functions only fetch and apply.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from credit_engine.engine.errors import InvalidInput
from credit_engine.engine.orgs import get_org
from credit_engine.engine.phone_numbers import (
    PhoneNumber,
    adopt_assistant,
    check_phone_number_id,
    import_number,
    registered_numbers,
)
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.vapi_account import AccountNumber, VapiAccount, VapiError

# Server fields the platform may have set that are kept when the engine becomes the server.
# (encryptedPaths is not: the engine could not read the encrypted fields.)
SERVER_FIELDS_KEPT = ("timeoutSeconds", "backoffPlan", "staticIpAddressesEnabled")

Progress = Callable[[int, int, int], None]
progress_numbers_min = 50  # fewer numbers are connected too fast for a progress line to help


def where(url: Any) -> str:
    """A server URL without its query, fragment or user info (they may carry a token)."""
    parts = urlsplit(str(url))
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def server_problems(current: dict[str, Any] | None, desired: dict[str, Any]) -> list[str]:
    """Why `current` (a number's `server` at Vapi) does not send the engine its messages, as
    `desired` (engine_server's) would; empty when it does. Other fields (a timeout) may differ."""
    if current is None or not current.get("url"):
        return ["no server: its assistant-requests go to the account's server URL, not the engine"]
    problems = []
    if current["url"] != desired["url"]:
        problems.append(f"its server is {where(current['url'])}, not the engine ({desired['url']})")
    raw_headers = current.get("headers")
    headers = {str(k).lower(): v for k, v in raw_headers.items()} if isinstance(raw_headers, dict) else {}
    credential_id = desired.get("credentialId")
    if credential_id is not None:
        if current.get("credentialId") != credential_id:
            given = current.get("credentialId")
            problems.append(
                f"it authenticates with {'credential ' + str(given) if given else 'no credential'}, "
                f"not credential {credential_id}"
            )
        if "authorization" in headers:
            problems.append("an Authorization header overrides the credential")
    elif "headers" in desired:
        given_secret = headers.get("x-vapi-secret")
        if given_secret is None:
            problems.append("no X-Vapi-Secret header: the engine would refuse its messages (401)")
        elif given_secret != desired["headers"]["X-Vapi-Secret"]:
            problems.append(
                "its X-Vapi-Secret header is not VAPI_WEBHOOK_SECRET: the engine would refuse its messages (401)"
            )
    else:
        problems.append(
            "neither CREDIT_ENGINE_VAPI_CREDENTIAL_ID nor VAPI_WEBHOOK_SECRET is set: nothing authenticates it"
        )
    if current.get("encryptedPaths"):
        problems.append("encryptedPaths is set: the engine cannot read encrypted fields")
    return problems


def new_server(current: dict[str, Any] | None, desired: dict[str, Any]) -> dict[str, Any]:
    kept = {name: current[name] for name in SERVER_FIELDS_KEPT if current and current.get(name) is not None}
    return {**kept, **desired}


# -- import -------------------------------------------------------------------------------------

IMPORT_OUTCOMES = ("registered", "unregistered", "already_registered", "not_importable")


@dataclass(frozen=True)
class ImportLine:
    number: AccountNumber
    outcome: str  # one of IMPORT_OUTCOMES; "unregistered": a dry run, `--org ORG` would register it
    org_id: str | None
    assistant_id: str | None  # the assistant the engine answers (or would) for this number
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.number.id,
            "number": self.number.label,
            "attached": self.number.attached,
            "outcome": self.outcome,
            "org_id": self.org_id,
            "assistant_id": self.assistant_id,
            "detail": self.detail,
        }


def import_plan(
    number: AccountNumber, registered: PhoneNumber | None, org_id: str | None, default_assistant_id: str | None
) -> ImportLine:
    """What importing `number` into `org_id` does (None: a dry run); "registered" means "register it now"."""
    if registered is not None:
        detail = f"registered to {registered.org_id} already, left alone"
        if registered.status != "active":
            detail += f" ({registered.status})"
        if number.assistant_id and registered.assistant_id and number.assistant_id != registered.assistant_id:
            detail += f"; the engine answers {registered.assistant_id}, Vapi has {number.assistant_id} attached"
        return ImportLine(number, "already_registered", registered.org_id, registered.assistant_id, detail)
    if number.squad_id or number.workflow_id:
        return _not_importable(
            number,
            f"{number.attached} is attached and the engine answers assistants only; "
            "attach an assistant at Vapi and import again",
        )
    if number.assistant_id is None and default_assistant_id is None:
        return _not_importable(
            number,
            "bare at Vapi, with no assistant for the engine to answer; attach one at Vapi "
            "(or set CREDIT_ENGINE_DEFAULT_ASSISTANT_ID) and import again",
        )
    try:
        check_phone_number_id(number.id)
    except InvalidInput:
        return _not_importable(number, "its id is not 1-128 printable characters")
    answers = number.assistant_id or f"the default assistant {default_assistant_id}"
    if org_id is None:
        detail = f"not registered: --org ORG registers it, and the engine will answer {answers}"
        return ImportLine(number, "unregistered", None, number.assistant_id, detail)
    detail = f"registered to {org_id}: the engine answers {answers}"
    return ImportLine(number, "registered", org_id, number.assistant_id, detail)


def _not_importable(number: AccountNumber, why: str) -> ImportLine:
    return ImportLine(number, "not_importable", None, None, "not registered: " + why)


@dataclass
class ImportReport:
    org_id: str | None
    lines: list[ImportLine]

    def count(self, outcome: str) -> int:
        return sum(line.outcome == outcome for line in self.lines)

    @property
    def ok(self) -> bool:
        """Every number could be registered (a dry run registers nothing, so cannot fail)."""
        return self.org_id is None or self.count("not_importable") == 0

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "dry_run": self.org_id is None,
            "org_id": self.org_id,
            "counts": {outcome: self.count(outcome) for outcome in IMPORT_OUTCOMES},
            "numbers": [line.as_json() for line in self.lines],
        }

    def table(self) -> str:
        rows = [(line.number.label, line.number.id, line.number.attached or "bare", line.detail) for line in self.lines]
        lines = _columns(rows)
        unregistered, already, refused = (
            self.count(o) for o in ("unregistered", "already_registered", "not_importable")
        )
        if self.org_id is None:
            lines.append(
                f"{len(self.lines)} numbers on the Vapi account: {unregistered} not registered, {already} "
                f"registered already, {refused} cannot be registered. Nothing was changed: "
                f"`credit-engine vapi import --org ORG` registers the {unregistered} to ORG."
            )
        else:
            lines.append(
                f"registered {self.count('registered')} to {self.org_id}; {already} registered already (left "
                f"alone); {refused} cannot be registered. Next: `credit-engine vapi connect`."
            )
        return "\n".join(lines)


async def import_numbers(
    rt: Runtime, account: VapiAccount, org_id: str | None, *, on_page: Callable[[int, int], None] | None = None
) -> ImportReport:
    """List the account's numbers; with `org_id`, register every one not registered yet to it."""
    if org_id is not None:
        await get_org(rt, org_id)  # OrgNotFound before anything is listed
    numbers = await account.list_numbers(on_page=on_page)
    registry = {known.vapi_phone_number_id: known for known in await registered_numbers(rt)}
    lines = []
    for number in sorted(numbers, key=lambda number: (number.label, number.id)):
        line = import_plan(number, registry.get(number.id), org_id, rt.settings.default_assistant_id)
        if line.outcome == "registered":
            assert org_id is not None
            line = await _register(rt, line, org_id)
        lines.append(line)
    return ImportReport(org_id, lines)


async def _register(rt: Runtime, line: ImportLine, org_id: str) -> ImportLine:
    number = line.number
    registered = await import_number(
        rt, org_id, number.id, number=number.number, assistant_id=number.assistant_id, provider=number.provider
    )
    if registered is not None:
        return line
    # Registered by someone else since the registry was read: left alone, like any registered number.
    owner = {known.vapi_phone_number_id: known for known in await registered_numbers(rt)}.get(number.id)
    assert owner is not None
    return import_plan(number, owner, org_id, rt.settings.default_assistant_id)


# -- connect ------------------------------------------------------------------------------------

CONNECT_OUTCOMES = ("connected", "already_connected", "would_connect", "failed")


@dataclass(frozen=True)
class ConnectPlan:
    problem: str | None = None  # not to be touched, and why
    adopt: str | None = None  # the assistant attached at Vapi, to record as the engine's before detaching it
    changes: dict[str, Any] = field(default_factory=dict)  # the PATCH body (without `provider`); empty: nothing to do


def connect_plan(
    registered: PhoneNumber, number: AccountNumber | None, desired: dict[str, Any], default_assistant_id: str | None
) -> ConnectPlan:
    if number is None:
        return ConnectPlan(problem="not on the Vapi account (deleted there?)")
    if number.squad_id or number.workflow_id:
        return ConnectPlan(
            problem=f"{number.attached} is attached at Vapi and the engine answers assistants only: "
            "not made bare; detach it at Vapi if the engine's assistant should answer, then connect again"
        )
    adopt = None
    if number.assistant_id is not None:
        if registered.assistant_id is None:
            adopt = number.assistant_id
        elif registered.assistant_id != number.assistant_id:
            return ConnectPlan(
                problem=f"Vapi has assistant {number.assistant_id} attached but the engine answers "
                f"{registered.assistant_id}: not made bare; register the right one (POST "
                "/api/admin/phone-numbers) or attach it at Vapi, then connect again"
            )
    if (registered.assistant_id or adopt or default_assistant_id) is None:
        return ConnectPlan(
            problem="no assistant for the engine to answer (its calls would be refused): attach one at "
            "Vapi or register one, then connect again"
        )
    changes: dict[str, Any] = {name: None for name in number.attached_fields}
    if server_problems(number.server, desired):
        changes["server"] = new_server(number.server, desired)
    return ConnectPlan(adopt=adopt, changes=changes)


@dataclass(frozen=True)
class ConnectLine:
    registered: PhoneNumber
    label: str
    outcome: str  # one of CONNECT_OUTCOMES
    detail: str
    changed: tuple[str, ...] = ()  # the fields sent (never their values: a server may carry the secret)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.registered.vapi_phone_number_id,
            "number": self.label,
            "org_id": self.registered.org_id,
            "outcome": self.outcome,
            "changed": list(self.changed),
            "detail": self.detail,
        }


@dataclass
class ConnectReport:
    dry_run: bool
    lines: list[ConnectLine]

    def count(self, outcome: str) -> int:
        return sum(line.outcome == outcome for line in self.lines)

    @property
    def ok(self) -> bool:
        return self.count("failed") == 0

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "dry_run": self.dry_run,
            "counts": {outcome: self.count(outcome) for outcome in CONNECT_OUTCOMES},
            "numbers": [line.as_json() for line in self.lines],
        }

    def table(self) -> str:
        if not self.lines:
            return "no registered numbers: `credit-engine vapi import --org ORG` registers the account's numbers first"
        rows = [
            (line.label, line.registered.vapi_phone_number_id, line.registered.org_id, line.detail)
            for line in self.lines
        ]
        lines = _columns(rows)
        counts = ", ".join(f"{self.count(o)} {o.replace('_', ' ')}" for o in CONNECT_OUTCOMES if self.count(o))
        lines.append(counts + (" (a dry run: nothing was changed)" if self.dry_run else ""))
        return "\n".join(lines)


async def connect_numbers(
    rt: Runtime,
    account: VapiAccount,
    desired: dict[str, Any],
    *,
    org_id: str | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    on_page: Callable[[int, int], None] | None = None,
) -> ConnectReport:
    """Make every registered number (of `org_id`, if given) bare, with the engine as its server."""
    assert desired.get("url")
    if org_id is not None:
        await get_org(rt, org_id)  # OrgNotFound before anything is listed
    numbers = {number.id: number for number in await account.list_numbers(on_page=on_page)}
    registry = [known for known in await registered_numbers(rt, org_id) if known.status != "released"]
    lines: list[ConnectLine] = []
    for registered in registry:
        number = numbers.get(registered.vapi_phone_number_id)
        lines.append(await _connect_one(rt, account, registered, number, desired, dry_run))
        if progress is not None and len(registry) >= progress_numbers_min:
            progress(len(lines), len(registry), sum(line.outcome == "failed" for line in lines))
    return ConnectReport(dry_run, lines)


async def _connect_one(
    rt: Runtime,
    account: VapiAccount,
    registered: PhoneNumber,
    number: AccountNumber | None,
    desired: dict[str, Any],
    dry_run: bool,
) -> ConnectLine:
    label = number.label if number is not None else registered.number or registered.vapi_phone_number_id
    plan = connect_plan(registered, number, desired, rt.settings.default_assistant_id)
    if plan.problem is not None:
        return ConnectLine(registered, label, "failed", plan.problem)
    if not plan.changes:
        return ConnectLine(registered, label, "already_connected", "bare, and its server is the engine")
    assert number is not None
    changed = tuple(plan.changes)
    if dry_run:
        return ConnectLine(registered, label, "would_connect", "would change " + ", ".join(changed), changed)
    try:
        if plan.adopt is not None:
            # Recorded before the number is made bare: from then on only the engine answers it.
            await adopt_assistant(rt, registered.vapi_phone_number_id, plan.adopt)
        updated = await account.update_number(number, plan.changes)
    except VapiError as error:
        return ConnectLine(registered, label, "failed", str(error), changed)
    except Exception as error:  # one number's trouble (Postgres, say) must not stop the others
        return ConnectLine(registered, label, "failed", f"{type(error).__name__}: {error}", changed)
    return ConnectLine(registered, label, *_as_updated(number, updated, plan, desired), changed)


def _as_updated(
    before: AccountNumber, updated: AccountNumber, plan: ConnectPlan, desired: dict[str, Any]
) -> tuple[str, str]:
    """(outcome, detail) of an update Vapi took, from the number as Vapi now has it: still
    attached, or a server other than the engine, is a failure."""
    left = server_problems(updated.server, desired)
    if updated.attached:
        left.insert(0, f"{updated.attached} is still attached")
    if left:
        return "failed", "Vapi took the update but: " + "; ".join(left)
    detail = "bare, and its server is the engine"
    if before.attached:
        detail = f"{before.attached} detached: {detail}"
    if plan.adopt is not None:
        detail += f"; the engine answers {plan.adopt} (as attached at Vapi)"
    return "connected", detail


def _columns(rows: Sequence[tuple[str, ...]]) -> list[str]:
    """Rows aligned in columns; the last (a sentence) is not padded."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)), row[-1]]) for row in rows]
