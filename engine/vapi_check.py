"""`credit-engine vapi check`: is the platform's Vapi account connected to the engine?

A tick or a cross (as `verify` prints them, `!` for a tick with a warning) for:

- the account: VAPI_API_KEY lists its numbers;
- the public URL: `GET <CREDIT_ENGINE_PUBLIC_URL>/healthz` answers 200 within
  `public_url_probe_timeout_s`, from where this command runs (a loopback or private address, or
  plain http, passes with a warning: Vapi cannot reach the one, and reads the other unencrypted);
- the credential: CREDIT_ENGINE_VAPI_CREDENTIAL_ID is a webhook credential at Vapi whose plan the
  engine reads (a bearer token on Authorization or X-Vapi-Secret, or HMAC-SHA256 on x-signature and
  x-timestamp over `{timestamp}.{body}`, hex); unset, the webhook secret is the numbers' header;
- every registered number that is not released: on the account, bare, its server the engine
  (engine_server's URL and authentication), and an assistant for the engine to answer that Vapi
  knows (GET /assistant/{id}, at most `vapi_assistants_checked_max` distinct ones).

- every saved workflow a platform answered a call with (newest first, at most
  `vapi_workflows_checked_max`): Vapi knows it, its own server (if it names one) is the engine, and
  its monitorPlan enables control. A workflow's overrides carry only variables, so the engine cannot
  make itself the server of a workflow's call the way it does for an assistant's or a squad's.

Numbers on the account that are registered to no org pass with a warning (their calls get "not
set up" once bare, or skip the engine while an assistant is attached).
"""

import ipaddress
import time
from typing import Any

import httpx

from credit_engine.engine import limits
from credit_engine.engine.call_server import engine_server, workflows_answered
from credit_engine.engine.config import Settings
from credit_engine.engine.phone_numbers import PhoneNumber, registered_numbers
from credit_engine.engine.runtime import Runtime
from credit_engine.engine.vapi_account import AccountNumber, VapiAccount, VapiError
from credit_engine.engine.vapi_setup import server_problems
from credit_engine.engine.verify import Check, Verification

# What webapp/auth.py reads from an HMAC credential: (field, Vapi's default, accepted values).
HMAC_EXPECTED = (
    ("algorithm", None, ("sha256",)),
    ("signatureHeader", "x-signature", ("x-signature",)),
    ("timestampHeader", "x-timestamp", ("x-timestamp",)),
    ("includeTimestamp", True, (True,)),
    ("payloadFormat", "{timestamp}.{body}", ("{timestamp}.{body}",)),
    ("signatureEncoding", "hex", ("hex",)),
    ("secretIsBase64", False, (False,)),
    ("signaturePrefix", "", ("", "sha256=")),
)


def credential_problems(credential: dict[str, Any]) -> tuple[list[str], str]:
    """(why the engine would refuse what Vapi sends with this credential, how it authenticates)."""
    provider = credential.get("provider")
    if provider != "webhook":
        return [f"it is a {provider!r} credential, not a webhook credential"], ""
    plan = credential.get("authenticationPlan")
    if not isinstance(plan, dict):
        return ["it has no authentication plan"], ""
    kind = plan.get("type")
    if kind == "bearer":
        header = str(plan.get("headerName") or "Authorization")
        prefixed = plan.get("bearerPrefixEnabled") is not False
        if (header.lower(), prefixed) in (("authorization", True), ("x-vapi-secret", False)):
            return [], f"a bearer token on {header} (it must be VAPI_WEBHOOK_SECRET)"
        how_sent = f"{header} {'with' if prefixed else 'without'} the Bearer prefix"
        return [
            f"its bearer token goes on {how_sent}: the engine reads Authorization: Bearer <secret>, "
            + "or X-Vapi-Secret: <secret> without a prefix"
        ], ""
    if kind == "hmac":
        problems = []
        for name, default, accepted in HMAC_EXPECTED:
            value = plan.get(name)
            value = default if value is None else value
            if isinstance(value, str) and name.endswith("Header"):
                value = value.lower()
            if value not in accepted:
                problems.append(f"HMAC {name} is {value!r}: the engine needs {' or '.join(map(repr, accepted))}")
        how = "HMAC-SHA256 on x-signature and x-timestamp (its secret must be VAPI_WEBHOOK_HMAC_SECRET, else VAPI_WEBHOOK_SECRET)"
        return problems, how
    if kind == "oauth2":
        return ["its plan is OAuth2 and the engine issues no tokens: use a bearer or an HMAC plan"], ""
    return [f"its authentication plan {kind!r} is not one the engine reads"], ""


def unreachable_for_vapi(public_url: str) -> str | None:
    """Why Vapi could not use a public URL the engine itself reaches, if it could not."""
    parts = httpx.URL(public_url)
    host = parts.host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if host == "localhost" or (
        address is not None and (address.is_loopback or address.is_private or address.is_link_local)
    ):
        return f"{host} is a loopback or private address: Vapi cannot reach it (this only shows the engine reaches it)"
    if parts.scheme == "http":
        return "plain http: Vapi would send its messages (and any secret header) unencrypted"
    return None


async def public_url_check(settings: Settings, timeout_s: float = limits.public_url_probe_timeout_s) -> Check:
    name = "public url"
    if settings.public_url is None:
        return Check(
            name, False, "CREDIT_ENGINE_PUBLIC_URL is not set: the numbers cannot name the engine as their server"
        )
    url = settings.public_url + "/healthz"
    started = time.monotonic()
    try:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
            response = await client.get(url)
    except httpx.TimeoutException:
        return Check(name, False, f"GET {url}: no answer within {timeout_s:g}s")
    except httpx.HTTPError as error:
        return Check(name, False, f"GET {url}: {type(error).__name__}, not reachable from here")
    if response.status_code != 200:
        return Check(name, False, f"GET {url} answered {response.status_code}, not 200")
    detail = f"GET {url} answered 200 in {1000 * (time.monotonic() - started):.0f} ms"
    warning = unreachable_for_vapi(settings.public_url)
    return Check(name, True, detail + (f"; but {warning}" if warning else ""), warning=warning is not None)


async def credential_check(account: VapiAccount, settings: Settings) -> Check:
    name = "credential"
    credential_id = settings.vapi_credential_id
    if credential_id is None:
        if settings.vapi_webhook_secret is None:
            return Check(
                name,
                False,
                "neither CREDIT_ENGINE_VAPI_CREDENTIAL_ID nor VAPI_WEBHOOK_SECRET is set: "
                "nothing would authenticate Vapi to the engine",
            )
        return Check(
            name,
            True,
            "CREDIT_ENGINE_VAPI_CREDENTIAL_ID is not set: the numbers' server carries "
            "VAPI_WEBHOOK_SECRET as an X-Vapi-Secret header",
        )
    try:
        credential = await account.credential(credential_id)
    except VapiError as error:
        return Check(name, False, str(error))
    if credential is None:
        return Check(
            name,
            False,
            f"credential {credential_id} (CREDIT_ENGINE_VAPI_CREDENTIAL_ID) is not on the Vapi account (404)",
        )
    problems, how = credential_problems(credential)
    if problems:
        return Check(name, False, f"credential {credential_id}: " + "; ".join(problems))
    return Check(name, True, f"credential {credential_id}: a webhook credential, {how}")


def number_problems(
    registered: PhoneNumber,
    number: AccountNumber | None,
    desired: dict[str, Any] | None,
    answer: str | None,
    assistant_problem: str | None,
) -> list[str]:
    """Why calls to a registered number would not be credit-checked and answered by the engine."""
    if number is None:
        return ["not on the Vapi account (deleted there?)"]
    problems = []
    if number.attached:
        problems.append(f"{number.attached} is attached at Vapi: its calls skip the engine (no assistant-request)")
    if desired is None:
        problems.append("its server is not checked: CREDIT_ENGINE_PUBLIC_URL is not set")
    else:
        problems += server_problems(number.server, desired)
    if answer is None and number.assistant_id is None:
        problems.append("no assistant for the engine to answer: its calls are refused as not set up")
    elif assistant_problem is not None:
        problems.append(assistant_problem)
    return problems


async def _assistant_problems(account: VapiAccount, assistant_ids: set[str]) -> tuple[dict[str, str | None], int]:
    """For each assistant (up to the bound) None if Vapi knows it, else why not; and how many were skipped."""
    checked = sorted(assistant_ids)[: limits.vapi_assistants_checked_max]
    problems: dict[str, str | None] = {}
    for assistant_id in checked:
        try:
            found = await account.assistant(assistant_id)
        except VapiError as error:
            problems[assistant_id] = str(error)
            continue
        unknown = f"the engine answers assistant {assistant_id}, which Vapi does not know (404): its calls would fail"
        problems[assistant_id] = None if found is not None else unknown
    return problems, len(assistant_ids) - len(checked)


async def check_account(rt: Runtime, account: VapiAccount, settings: Settings) -> Verification:
    try:
        numbers = await account.list_numbers()
        listing = Check("vapi account", True, f"VAPI_API_KEY lists {len(numbers)} numbers on the account")
    except VapiError as error:
        numbers, listing = None, Check("vapi account", False, str(error))
    checks = [listing, await public_url_check(settings), await credential_check(account, settings)]
    if numbers is None:
        return Verification(
            [*checks, Check("numbers", False, "not checked: the account's numbers could not be listed")]
        )
    registry = await registered_numbers(rt)
    checks += await _number_checks(account, settings, registry, numbers)
    checks += await _workflow_checks(rt, account, settings)
    return Verification(checks + _coverage_checks(registry, numbers))


def workflow_problems(workflow: dict[str, Any], desired: dict[str, Any] | None) -> tuple[list[str], str]:
    """(why a call answered with this saved workflow would escape the engine, what is fine)."""
    problems = []
    server = workflow.get("server") if isinstance(workflow.get("server"), dict) else None
    if server is None or not server.get("url"):
        fine = "no server of its own (its calls' messages go to the number's server, the engine)"
    elif desired is None:
        problems.append("its server is not checked: CREDIT_ENGINE_PUBLIC_URL is not set")
        fine = ""
    else:
        problems += [f"{problem}: its calls' messages skip the engine" for problem in server_problems(server, desired)]
        fine = "its server is the engine"
    plan = workflow.get("monitorPlan")
    monitor = plan if isinstance(plan, dict) else {}
    if monitor.get("controlEnabled") is not True:
        problems.append("monitorPlan.controlEnabled is not true: the kill switch cannot end its calls")
    return problems, f"{fine}, control enabled"


async def _workflow_checks(rt: Runtime, account: VapiAccount, settings: Settings) -> list[Check]:
    """One check per saved workflow a platform answered with (engine/call_server.remember_workflow)."""
    desired = engine_server(settings)
    workflow_ids = await workflows_answered(rt, limits.vapi_workflows_checked_max + 1)
    checks = []
    for workflow_id in workflow_ids[: limits.vapi_workflows_checked_max]:
        name = f"workflow {workflow_id}"
        try:
            workflow = await account.workflow(workflow_id)
        except VapiError as error:
            checks.append(Check(name, False, str(error)))
            continue
        if workflow is None:
            checks.append(Check(name, False, "a platform answered calls with it, and Vapi does not know it (404)"))
            continue
        problems, fine = workflow_problems(workflow, desired)
        checks.append(Check(name, not problems, "; ".join(problems) if problems else fine))
    if len(workflow_ids) > limits.vapi_workflows_checked_max:
        detail = f"only the newest {limits.vapi_workflows_checked_max} workflows platforms answered with were checked"
        checks.append(Check("workflows", True, detail, warning=True))
    return checks


async def _number_checks(
    account: VapiAccount, settings: Settings, registry: list[PhoneNumber], numbers: list[AccountNumber]
) -> list[Check]:
    """One check per registered number that is not released."""
    desired = engine_server(settings)
    live = [known for known in registry if known.status != "released"]
    answers = {known.vapi_phone_number_id: known.assistant_id or settings.default_assistant_id for known in live}
    assistant_problem, skipped = await _assistant_problems(account, {a for a in answers.values() if a is not None})
    by_id = {number.id: number for number in numbers}
    checks = []
    for known in live:
        number = by_id.get(known.vapi_phone_number_id)
        answer = answers[known.vapi_phone_number_id]
        problems = number_problems(known, number, desired, answer, assistant_problem.get(answer) if answer else None)
        label = f"{number.label if number else known.number or '?'} {known.vapi_phone_number_id}"
        if problems:
            checks.append(Check(label, False, f"{known.org_id}: " + "; ".join(problems)))
            continue
        suspended = " (suspended: its calls are refused until its rent is paid)" if known.status == "suspended" else ""
        detail = f"{known.org_id}{suspended}: bare, its server is the engine, answers {answer}"
        checks.append(Check(label, True, detail))
    if skipped:
        detail = f"{skipped} assistants not looked up at Vapi (over {limits.vapi_assistants_checked_max})"
        checks.append(Check("assistants", True, detail, warning=True))
    return checks


def _coverage_checks(registry: list[PhoneNumber], numbers: list[AccountNumber]) -> list[Check]:
    """Warnings: no registered number at all; numbers on the account registered to no org."""
    checks = []
    if all(known.status == "released" for known in registry):
        detail = "none: `credit-engine vapi import --org ORG` registers the account's numbers"
        checks.append(Check("registered numbers", True, detail, warning=True))
    known_ids = {known.vapi_phone_number_id for known in registry}
    strangers = [number for number in numbers if number.id not in known_ids]
    if strangers:
        shown = ", ".join(number.label for number in strangers[:5]) + (", ..." if len(strangers) > 5 else "")
        detail = f"{len(strangers)} numbers on the account are registered to no org ({shown}): `vapi import` lists them"
        checks.append(Check("unregistered numbers", True, detail, warning=True))
    return checks
