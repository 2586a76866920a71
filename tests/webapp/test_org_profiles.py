"""An org's Vapi profile over HTTP: its own refusal sentences spoken to its callers (the defaults
otherwise), its `forward_url` held to the address rule, both set and refused through the admin API;
and every org setting present wherever a setting must be declared."""

import dataclasses

import pytest

from credit_engine.engine import limits
from credit_engine.engine.org_profiles import REFUSAL_DEFAULTS, Refusal
from credit_engine.engine.org_settings import REFUSAL_SETTINGS, OrgSettings
from credit_engine.engine.phone_numbers import forget_owner
from credit_engine.engine.runtime import Runtime
from credit_engine.webapp.vapi import SPOKEN_BUSY, SPOKEN_NO_CREDIT, SPOKEN_NOT_SET_UP, SPOKEN_TRY_LATER
from tests.webapp.conftest import Api
from tests.webapp.test_alerts_api import INTERNAL_URLS
from tests.webapp.test_seed_scenarios import wallet
from tests.webapp.vapi_payloads import assistant_request, call

OWN = {
    "refusal_no_credit": "Acme here: your prepaid minutes have run out. Top up at acme.example and call back.",
    "refusal_busy": "Acme here: every agent is on a call. Please ring again shortly.",
    "refusal_not_set_up": "Acme here: this line is closed for now.",
    "refusal_try_later": "Acme here: something went wrong on our side. Please call again in a minute.",
}
BAD_SENTENCES = (
    "",
    "   ",
    "\t\n",
    "x" * (limits.refusal_text_length_max + 1),
    "a\x00b",
    "two\nlines",
    "bell\x07",
    "\u200b",
    5,
    True,
    ["a"],
    {"a": 1},
)


async def refusal(api: Api, call_id: str, number: str) -> str:
    answer = await api.vapi(assistant_request(call(call_id, phone_number_id=number)))
    assert answer.status_code == 200
    spoken = answer.json()["error"]
    assert isinstance(spoken, str) and spoken.strip()  # never empty: Vapi would say "Unknown Error"
    return spoken


async def test_an_orgs_own_sentences_are_spoken_for_each_refusal(api: Api, rt: Runtime) -> None:
    short, _ = await api.new_org(59, **OWN)  # less than a minute at 60p/min
    assert await refusal(api, "c-short", await api.register_number(short)) == OWN["refusal_no_credit"]

    busy, _ = await api.new_org(10_000, max_concurrent_calls=1, **OWN)
    number = await api.register_number(busy)
    assert "assistantId" in (await api.vapi(assistant_request(call("c-first", phone_number_id=number)))).json()
    assert await refusal(api, "c-second", number) == OWN["refusal_busy"]

    # A suspended number is still its org's: the org's own "not set up".
    suspended, key = await api.new_org(10_000, **OWN)
    number = await api.register_number(suspended)
    await rt.pg.execute("UPDATE phone_numbers SET status = 'suspended' WHERE vapi_phone_number_id = $1", number)
    await forget_owner(rt, number)
    assert await refusal(api, "c-suspended", number) == OWN["refusal_not_set_up"]
    assert (await wallet(api, key))["held_pence"] == 0

    # Try later: a call id the engine cannot use (the org is known by its number).
    later, _ = await api.new_org(10_000, **OWN)
    number = await api.register_number(later)
    assert await refusal(api, "not a call id!", number) == OWN["refusal_try_later"]


async def test_the_defaults_are_spoken_for_an_org_without_sentences_and_for_an_unknown_number(
    api: Api, rt: Runtime
) -> None:
    await api.new_org(10_000, **OWN)  # another org's sentences reach nobody else
    plain, _ = await api.new_org(59, max_concurrent_calls=1)
    number = await api.register_number(plain)
    assert await refusal(api, "c-short", number) == SPOKEN_NO_CREDIT
    assert await refusal(api, "not a call id!", number) == SPOKEN_TRY_LATER
    await api.admin(
        "POST", f"/api/admin/orgs/{plain}/topups", {"amount_pence": 10_000}, headers={"Idempotency-Key": "more"}
    )
    assert "assistantId" in (await api.vapi(assistant_request(call("c-first", phone_number_id=number)))).json()
    assert await refusal(api, "c-second", number) == SPOKEN_BUSY
    await rt.pg.execute("UPDATE phone_numbers SET status = 'suspended' WHERE vapi_phone_number_id = $1", number)
    await forget_owner(rt, number)
    assert await refusal(api, "c-suspended", number) == SPOKEN_NOT_SET_UP
    # An unknown number has no org: the default, whatever any org says.
    assert await refusal(api, "c-nobody", "pn-nobody-knows") == SPOKEN_NOT_SET_UP
    assert {SPOKEN_NO_CREDIT, SPOKEN_BUSY, SPOKEN_NOT_SET_UP, SPOKEN_TRY_LATER} == set(REFUSAL_DEFAULTS.values())


async def test_a_changed_sentence_is_spoken_at_once_and_null_puts_the_default_back(api: Api) -> None:
    org, _ = await api.new_org(59)
    number = await api.register_number(org)
    assert await refusal(api, "c1", number) == SPOKEN_NO_CREDIT  # read once, now cached in the web process
    changed = await api.admin("PATCH", f"/api/admin/orgs/{org}", {"refusal_no_credit": "  Out of minutes, sorry.  "})
    assert (changed.status_code, changed.json()["refusal_no_credit"]) == (200, "Out of minutes, sorry.")  # trimmed
    assert await refusal(api, "c2", number) == "Out of minutes, sorry."  # this process forgot its copy
    reset = await api.admin("PATCH", f"/api/admin/orgs/{org}", {"refusal_no_credit": None})
    assert (reset.status_code, reset.json()["refusal_no_credit"]) == (200, None)
    assert await refusal(api, "c3", number) == SPOKEN_NO_CREDIT


async def test_the_profile_settings_are_created_shown_and_changed(api: Api) -> None:
    longest = "y" * limits.refusal_text_length_max
    org, _ = await api.new_org(refusal_busy=f"  {longest} ", forward_url="https://93.184.216.34/vapi")
    shown = (await api.admin("GET", f"/api/admin/orgs/{org}")).json()
    assert shown["forward_url"] == "https://93.184.216.34/vapi"
    assert shown["refusal_busy"] == longest  # 500 characters once trimmed: the longest allowed
    assert [shown[name] for name in ("refusal_no_credit", "refusal_not_set_up", "refusal_try_later")] == [None] * 3
    changed = await api.admin(
        "PATCH",
        f"/api/admin/orgs/{org}",
        {"refusal_try_later": "Bitte später noch einmal anrufen.", "forward_url": None},
    )
    assert changed.status_code == 200, changed.text
    assert (changed.json()["refusal_try_later"], changed.json()["forward_url"]) == (
        "Bitte später noch einmal anrufen.",
        None,
    )


@pytest.mark.parametrize("field", REFUSAL_SETTINGS)
async def test_a_blank_too_long_or_unprintable_sentence_is_refused_naming_it(api: Api, field: str) -> None:
    org, _ = await api.new_org(**{field: "A sentence that stays."})
    for n, bad in enumerate(BAD_SENTENCES):
        created = await api.admin(
            "POST", "/api/admin/orgs", {"org_id": f"bad-{n}", "name": "x", "rate_pence_per_minute": 1, field: bad}
        )
        assert (created.status_code, created.json()["error"]["field"]) == (422, field), repr(bad)
        changed = await api.admin("PATCH", f"/api/admin/orgs/{org}", {field: bad})
        assert (changed.status_code, changed.json()["error"]["field"]) == (422, field), repr(bad)
    assert (await api.admin("GET", "/api/admin/orgs/bad-0")).status_code == 404  # nothing was written
    assert (await api.admin("GET", f"/api/admin/orgs/{org}")).json()[field] == "A sentence that stays."


async def test_a_forward_url_to_an_internal_address_is_refused_and_a_public_one_accepted(api: Api) -> None:
    for n, url in enumerate(
        (*INTERNAL_URLS, "ftp://platform.test/", "https://platform.test/" + "p" * 2000, "not a url")
    ):
        created = await api.admin(
            "POST", "/api/admin/orgs", {"org_id": f"f{n}", "name": "x", "rate_pence_per_minute": 1, "forward_url": url}
        )
        assert (created.status_code, created.json()["error"]["field"]) == (422, "forward_url"), url
    org, _ = await api.new_org(forward_url="https://platform.test/vapi")  # does not resolve here: accepted
    for url in INTERNAL_URLS:
        changed = await api.admin("PATCH", f"/api/admin/orgs/{org}", {"forward_url": url})
        assert (changed.status_code, changed.json()["error"]["field"]) == (422, "forward_url"), url
    assert (await api.admin("GET", f"/api/admin/orgs/{org}")).json()["forward_url"] == "https://platform.test/vapi"
    public = await api.admin("PATCH", f"/api/admin/orgs/{org}", {"forward_url": "https://93.184.216.34/vapi?org=acme"})
    assert (public.status_code, public.json()["forward_url"]) == (200, "https://93.184.216.34/vapi?org=acme")


async def test_every_org_setting_is_declared_wherever_a_setting_must_be(api: Api) -> None:
    """OrgSettings is the table; the admin JSON, the OpenAPI schemas, the CLI, the snapshot SQL and
    the shipped schema each name every setting (and the CLI's --unset list is the nullable ones)."""
    from credit_engine import commands as cli
    from credit_engine.engine import org_setting_table as table
    from credit_engine.engine.schema import expected
    from credit_engine.engine.snapshots import ORGS_SQL
    from credit_engine.webapp.openapi import SCHEMAS, SETTINGS_PROPERTIES

    names = set(OrgSettings.names())
    assert {"forward_url", *REFUSAL_SETTINGS} <= names
    assert set(REFUSAL_SETTINGS) == {refusal.value for refusal in Refusal}
    assert set(SETTINGS_PROPERTIES) == names
    assert names <= set(SCHEMAS["OrgChange"]["properties"]) and names <= set(SCHEMAS["Org"]["properties"])
    org, _ = await api.new_org()
    assert names <= set((await api.admin("GET", f"/api/admin/orgs/{org}")).json())
    assert all(f"o.{name}" in ORGS_SQL for name in names)
    assert names <= set(expected()["tables"]["orgs"]["columns"])
    nullable = {f.name for f in dataclasses.fields(OrgSettings) if f.default is None}
    assert set(table.UNSETTABLE) == nullable
    assert cli.build_parser()  # builds its settings flags from the table (tests/engine/test_org_setting_table.py)
    for command in (["orgs", "create", "x", "--rate", "1"], ["orgs", "update", "x"]):
        assert names <= set(vars(cli.build_parser().parse_args(command))), command  # a flag for each
