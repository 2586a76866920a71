"""The platform's Vapi account through Vapi's REST API: its phone numbers, a credential, an
assistant, and its calls (`GET /call/{id}`, `GET /call` for the settle job and `audit vapi`).

Used by `credit-engine vapi import|connect|check` (engine/vapi_setup.py) with VAPI_API_KEY and
VAPI_BASE_URL. Every request has a bounded timeout. A 429, a 5xx or a transport error is tried
again (`vapi_request_attempts_max`, after a doubling backoff or Vapi's Retry-After up to
`vapi_retry_after_s_max`); anything else that is not a 2xx is a VapiError that names what was
asked (the number, the credential) and Vapi's status, and never carries a secret.

An optional `pace` is awaited before every request, each retry included: the settle job and the
audit pass engine/vapi_calls.VapiPace, which holds the deployment to CREDIT_ENGINE_VAPI_API_RPS.

Listing. `GET /phone-number` (and `GET /call`, within a createdAt window) answers at most `limit` numbers (1,000 at most) and has no page
cursor, only createdAt filters. So the next page asks for the numbers created at or before
(newest first) or at or after (oldest first) the last one seen, in whichever order the page came,
and drops the ids already seen: the bounds are inclusive so that numbers sharing the boundary's
timestamp are not lost. A page not ordered by createdAt, a page that brings no new number, and an
account bigger than `vapi_numbers_pages_max` pages stop the listing with an error, never with a
silently short list.
"""

import asyncio
import itertools
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, Self, TypeVar
from urllib.parse import quote

import httpx

from credit_engine.engine import limits
from credit_engine.engine.vapi_calls import VapiCallRecord, call_record_from

ATTACHMENTS = ("assistantId", "squadId", "workflowId")  # any of these set: no assistant-request
backoff_base_s = 0.5
error_detail_chars_max = 200
HINTS = {
    401: " (VAPI_API_KEY is not accepted)",
    403: " (VAPI_API_KEY may not do this)",
    404: " (not found)",
    429: " (rate limited)",
}


class VapiError(RuntimeError):
    """Vapi did not do what was asked. `status` is Vapi's HTTP status, None when it never answered."""

    def __init__(self, what: str, status: int | None, detail: str) -> None:
        self.what = what
        self.status = status
        super().__init__(f"{what}: {detail}")


@dataclass(frozen=True)
class AccountNumber:
    """One phone number on the account, as Vapi lists it (the SDK's `ListPhoneNumbersResponseItem`)."""

    id: str
    provider: str
    number: str | None
    name: str | None
    sip_uri: str | None
    status: str | None
    assistant_id: str | None
    squad_id: str | None
    workflow_id: str | None
    server: dict[str, Any] | None
    created_at: str

    @property
    def label(self) -> str:
        return self.number or self.sip_uri or self.name or self.id

    @property
    def attached(self) -> str | None:
        """What answers its calls at Vapi instead of an assistant-request, if anything."""
        for kind, value in (("assistant", self.assistant_id), ("squad", self.squad_id), ("workflow", self.workflow_id)):
            if value:
                return f"{kind} {value}"
        return None

    @property
    def attached_fields(self) -> tuple[str, ...]:
        """The JSON names of what is attached (PATCHed to null to make the number bare)."""
        values = (self.assistant_id, self.squad_id, self.workflow_id)
        return tuple(name for name, value in zip(ATTACHMENTS, values, strict=True) if value)


def _text(item: dict[str, Any], name: str) -> str | None:
    value = item.get(name)
    return value if isinstance(value, str) and value else None


def number_from(item: Any) -> AccountNumber:
    if not isinstance(item, dict) or _text(item, "id") is None or _text(item, "createdAt") is None:
        raise VapiError(
            "listing the account's phone numbers", None, "Vapi answered a number without an id or createdAt"
        )
    server = item.get("server")
    return AccountNumber(
        id=item["id"],
        provider=_text(item, "provider") or "vapi",
        number=_text(item, "number"),
        name=_text(item, "name"),
        sip_uri=_text(item, "sipUri"),
        status=_text(item, "status"),
        assistant_id=_text(item, "assistantId"),
        squad_id=_text(item, "squadId"),
        workflow_id=_text(item, "workflowId"),
        server=server if isinstance(server, dict) else None,
        created_at=item["createdAt"],
    )


class Listed(Protocol):
    """What paging by createdAt needs of a listed item (a number, a call)."""

    @property
    def id(self) -> str: ...

    @property
    def created_at(self) -> str: ...


def _instant(item: Listed, what: str) -> datetime:
    try:
        return datetime.fromisoformat(item.created_at.replace("Z", "+00:00"))
    except ValueError:
        raise VapiError(
            what, None, f"item {item.id} has a createdAt that is not a date: {item.created_at[:40]!r}"
        ) from None


def next_page_bound(page: Sequence[Listed], what: str = "listing the account's phone numbers") -> str:
    """The createdAt filter that continues after a full page: `createdAtLe` after a newest-first
    page, `createdAtGe` after an oldest-first one (with the last item's createdAt)."""
    instants = [_instant(item, what) for item in page]
    pairs = list(itertools.pairwise(instants))
    newest_first = all(a >= b for a, b in pairs)
    oldest_first = all(a <= b for a, b in pairs)
    if newest_first and oldest_first:
        raise VapiError(
            what, None, f"more than {len(page) - 1} items were created at {page[0].created_at}: cannot page past them"
        )
    if not (newest_first or oldest_first):
        raise VapiError(what, None, "Vapi's list is not ordered by createdAt, so it cannot be paged safely")
    return "createdAtLe" if newest_first else "createdAtGe"


Item = TypeVar("Item", bound=Listed)


def _iso(instant: datetime) -> str:
    assert instant.tzinfo is not None
    return instant.isoformat()


def _call_from(item: Any) -> VapiCallRecord:
    record = call_record_from(item)
    if record is None:
        raise VapiError("listing Vapi's calls", None, "Vapi answered a call without an id or createdAt")
    return record


def redact(text: str, *secrets: str | None) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return text


class VapiAccount:
    def __init__(
        self,
        api_key: str,
        base_url: str,
        *,
        timeout_s: float = limits.vapi_request_timeout_s,
        backoff_s: float = backoff_base_s,
        redacted: tuple[str | None, ...] = (),
        pace: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.pace = pace  # awaited before every request, each retry included (engine/vapi_calls.VapiPace)
        self.api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.redacted = (api_key, *redacted)  # never in an error message (Vapi may echo what it was sent)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), follow_redirects=False)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.client.aclose()

    async def list_numbers(
        self,
        *,
        page_size: int = limits.vapi_numbers_page_size,
        pages_max: int = limits.vapi_numbers_pages_max,
        on_page: Callable[[int, int], None] | None = None,
    ) -> list[AccountNumber]:
        """Every number on the account, each once (see the module docstring for the paging)."""
        return await self._list_all(
            "/phone-number",
            "listing the account's phone numbers",
            number_from,
            {},
            page_size,
            pages_max,
            on_page,
            "numbers",
        )

    async def list_calls(
        self,
        created_from: datetime,
        created_to: datetime,
        *,
        page_size: int = limits.vapi_calls_page_size,
        pages_max: int = limits.vapi_calls_pages_max,
        on_page: Callable[[int, int], None] | None = None,
    ) -> list[VapiCallRecord]:
        """Every call Vapi created in [created_from, created_to), each once, paged like the numbers
        (the SDK's `calls.list`: `createdAtGe`, `createdAtLt`, `limit`)."""
        assert created_from < created_to
        window = {"createdAtGe": _iso(created_from), "createdAtLt": _iso(created_to)}
        return await self._list_all(
            "/call", "listing Vapi's calls", _call_from, window, page_size, pages_max, on_page, "calls"
        )

    async def _list_all(
        self,
        path: str,
        what: str,
        parse: Callable[[Any], Item],
        window: dict[str, str],
        page_size: int,
        pages_max: int,
        on_page: Callable[[int, int], None] | None,
        noun: str,
    ) -> list[Item]:
        """Page through a createdAt-ordered list with no cursor, within the createdAt `window`."""
        assert 1 <= page_size <= 1_000
        assert pages_max >= 1
        seen: dict[str, Item] = {}
        params: dict[str, Any] = {"limit": page_size, **window}
        for page_index in range(pages_max):
            items = await self._request("GET", path, what, params=params)
            if not isinstance(items, list):
                raise VapiError(what, None, "Vapi answered something that is not a list")
            page = [parse(item) for item in items]
            fresh = [item for item in page if item.id not in seen]
            seen.update((item.id, item) for item in fresh)
            if on_page is not None:
                on_page(page_index + 1, len(seen))
            if len(page) < page_size:
                return list(seen.values())
            if not fresh:
                raise VapiError(what, None, f"a page of {page_size} brought no new item: cannot page further")
            bound = next_page_bound(page, what)
            # The window stays (an upper bound beside createdAtLe; createdAtGe is replaced by a later one).
            params = {"limit": page_size, **window, bound: page[-1].created_at}
        raise VapiError(what, None, f"more than {pages_max * page_size} {noun} to list (at most {pages_max} pages)")

    async def call(self, call_id: str) -> VapiCallRecord | None:
        """GET /call/{id}; None when Vapi does not know it (404)."""
        what = f"reading call {call_id}"
        found = await self._object(f"/call/{quote(call_id, safe='')}", what)
        if found is None:
            return None
        record = call_record_from(found)
        if record is None or record.id != call_id:
            raise VapiError(what, None, "Vapi answered a call without this id or a createdAt")
        return record

    async def update_number(self, number: AccountNumber, changes: dict[str, Any]) -> AccountNumber:
        """PATCH /phone-number/{id} with `changes` (the SDK's Update*PhoneNumberDto, `provider` being
        its union's discriminator); the number as Vapi has it afterwards."""
        assert changes
        assert "provider" not in changes
        what = f"updating number {number.label} ({number.id})"
        body = {"provider": number.provider, **changes}
        answer = await self._request("PATCH", f"/phone-number/{quote(number.id, safe='')}", what, json=body)
        if not isinstance(answer, dict) or answer.get("id") != number.id:
            raise VapiError(what, None, "Vapi answered without the number")
        return number_from(answer)

    async def credential(self, credential_id: str) -> dict[str, Any] | None:
        """GET /credential/{id}; None when Vapi does not know it (404)."""
        what = f"reading credential {credential_id}"
        return await self._object(f"/credential/{quote(credential_id, safe='')}", what)

    async def assistant(self, assistant_id: str) -> dict[str, Any] | None:
        """GET /assistant/{id}; None when Vapi does not know it (404)."""
        return await self._object(f"/assistant/{quote(assistant_id, safe='')}", f"reading assistant {assistant_id}")

    async def workflow(self, workflow_id: str) -> dict[str, Any] | None:
        """GET /workflow/{id}; None when Vapi does not know it (404)."""
        return await self._object(f"/workflow/{quote(workflow_id, safe='')}", f"reading workflow {workflow_id}")

    async def _object(self, path: str, what: str) -> dict[str, Any] | None:
        try:
            answer = await self._request("GET", path, what)
        except VapiError as error:
            if error.status == 404:
                return None
            raise
        if not isinstance(answer, dict):
            raise VapiError(what, None, "Vapi answered something that is not an object")
        return answer

    async def create_call(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /call (the SDK's `calls.create` body): the call as Vapi created it. Asked once and
        never again: Vapi's POST /call takes no idempotency key, so a retry after a timeout could
        place a second call. A VapiError's status None means Vapi never answered (the call may or
        may not have been placed); a status means Vapi answered it was not."""
        what = "placing a call"
        answer = await self._request("POST", "/call", what, json=body, attempts_max=1)
        if not isinstance(answer, dict):
            raise VapiError(what, None, "Vapi answered something that is not a call")
        return answer

    async def _request(
        self,
        method: str,
        path: str,
        what: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        attempts_max: int = limits.vapi_request_attempts_max,
    ) -> Any:
        assert 1 <= attempts_max <= limits.vapi_request_attempts_max
        headers = {"Authorization": f"Bearer {self.api_key}"}
        for attempt in range(attempts_max):
            last = attempt == attempts_max - 1
            if self.pace is not None:
                await self.pace()
            try:
                response = await self.client.request(
                    method, self.base_url + path, params=params, json=json, headers=headers
                )
            except httpx.TimeoutException:
                if last:
                    raise VapiError(what, None, f"Vapi did not answer within {self.timeout_s:g}s") from None
                await asyncio.sleep(self.backoff_s * 2**attempt)
                continue
            except httpx.HTTPError as error:
                if last:
                    raise VapiError(what, None, f"Vapi could not be reached ({type(error).__name__})") from None
                await asyncio.sleep(self.backoff_s * 2**attempt)
                continue
            if 200 <= response.status_code < 300:
                try:
                    return response.json()
                except ValueError:
                    raise VapiError(what, response.status_code, "Vapi answered with a body that is not JSON") from None
            if last or not (response.status_code == 429 or response.status_code >= 500):
                raise VapiError(what, response.status_code, self._status_detail(response))
            await asyncio.sleep(self._retry_after_s(response, attempt))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _status_detail(self, response: httpx.Response) -> str:
        status = response.status_code
        detail = (
            f"Vapi answered {status}{HINTS.get(status, ' (Vapi failed; try again later)' if status >= 500 else '')}"
        )
        if 400 <= status < 500 and status not in HINTS:
            try:
                message = response.json().get("message")
            except (ValueError, AttributeError):
                message = None
            if message:
                text = "; ".join(map(str, message)) if isinstance(message, list) else str(message)
                detail += ": " + redact(text, *self.redacted)[:error_detail_chars_max]
        return detail

    def _retry_after_s(self, response: httpx.Response, attempt: int) -> float:
        try:
            asked = float(response.headers.get("retry-after", ""))
        except ValueError:
            asked = math.nan
        if not math.isfinite(asked):
            asked = self.backoff_s * 2**attempt
        return min(max(asked, 0.0), limits.vapi_retry_after_s_max)
