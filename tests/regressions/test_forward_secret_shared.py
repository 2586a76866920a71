# ruff: noqa: F811 - the forwarding tests' fixtures (platform, app_settings) are imported and used by name
"""Found by an adversarial review (high): every forward target gets the one deployment-wide
CREDIT_ENGINE_FORWARD_SECRET as `X-Vapi-Secret` (engine/forwarding.Forwarder.headers; webapp/vapi._target):
the operator's platform (CREDIT_ENGINE_FORWARD_URL), every org's own `forward_url`, and any
`server.url` an org's platform wrote into its assistant-request answer. So org A's platform (or
whatever host its answer names) learns the secret that org B's platform, and the operator's,
accept as "this is the engine forwarding Vapi": it can forge status-updates, end-of-call-reports
and tool-calls of org B's calls to B's platform. Per-org secrets exist already for alerts
(`org_signing_secret`): forwarding should use one per org (or per target), never the shared one.

Fixed: the operator's own URLs get the forward secret; any URL an org or a platform's answer chose
gets the org's secret, derived from it (engine/forwarding.forward_secret_for), which the org reads
from GET /api/forwarding/secret."""

from tests.fake_platform import FakePlatform, Reply
from tests.webapp.conftest import Api
from tests.webapp.test_forwarding import (  # noqa: F401
    PLATFORM_SECRET,
    TRANSIENT,
    app_settings,
    eventually,
    platform,
)
from tests.webapp.vapi_payloads import assistant_request, call, status_update


async def test_an_orgs_platform_does_not_receive_the_secret_other_platforms_trust(
    api: Api, platform: FakePlatform
) -> None:
    org_a, _ = await api.new_org(600, forward_url=f"{platform.base_url}/platform-a")
    org_b, _ = await api.new_org(600)  # on the operator's platform (CREDIT_ENGINE_FORWARD_URL: /vapi)
    number_a = await api.register_number(org_a)
    number_b = await api.register_number(org_b)
    platform.replies["assistant-request"] = Reply(body={"assistantId": "asst-platform"})
    await api.vapi(assistant_request(call("c-a", phone_number_id=number_a)))
    await api.vapi(assistant_request(call("c-b", phone_number_id=number_b)))
    (to_a,) = [g for g in platform.got if g.path == "/platform-a"]
    (to_b,) = [g for g in platform.got if g.path == "/vapi"]
    assert to_b.headers["x-vapi-secret"] == PLATFORM_SECRET
    assert to_a.headers.get("x-vapi-secret") != to_b.headers["x-vapi-secret"], (
        "org A's platform got the very secret the operator's platform (org B's) trusts from the engine"
    )


async def test_a_url_the_platforms_answer_chose_does_not_receive_the_forward_secret(
    api: Api, platform: FakePlatform
) -> None:
    """An answer is the platform's text: the URL in it is not the operator's choice, yet it gets
    the operator's secret with every one of the call's messages."""
    org, _ = await api.new_org(600, forward_url=f"{platform.base_url}/platform-a")
    number = await api.register_number(org)
    chosen = {**TRANSIENT, "server": {"url": f"{platform.base_url}/anywhere-the-answer-chose"}}
    platform.replies["assistant-request"] = Reply(body={"assistant": chosen})
    await api.vapi(assistant_request(call("c-chosen", phone_number_id=number)))
    await api.vapi(status_update(call("c-chosen", phone_number_id=number), "in-progress"))
    await eventually(lambda: platform.types("/anywhere-the-answer-chose") == ["status-update"])
    (got,) = [g for g in platform.got if g.path == "/anywhere-the-answer-chose"]
    assert got.headers.get("x-vapi-secret") != PLATFORM_SECRET, (
        "the deployment's forward secret went to a URL an answer chose"
    )
