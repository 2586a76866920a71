"""Phone-number provisioning (org API key): the price, and buying a number with it."""

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from credit_engine.engine.provisioning import OPERATION, Provision, ProvisionRequest, provision
from credit_engine.webapp import answers
from credit_engine.webapp import requests as req
from credit_engine.webapp.responses import json_response
from credit_engine.webapp.wallet import CURRENCY, org_context

AREA_CODE = re.compile(r"[0-9]{3}")
ASSISTANT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


async def pricing(request: Request) -> Response:
    ctx, _ = await org_context(request)
    return json_response({"phone_number_pence": ctx.settings.phone_number_pence, "currency": CURRENCY})


async def provision_number(request: Request) -> Response:
    ctx, org_id = await org_context(request)
    key = req.idempotency_key(request)
    body = await req.json_object(request, allowed={"area_code", "assistant_id"})
    wanted = ProvisionRequest(
        area_code=req.text(body, "area_code", pattern=AREA_CODE, length_max=3),
        assistant_id=req.text(body, "assistant_id", pattern=ASSISTANT_ID, length_max=128),
    )
    once = await provision(ctx.rt, ctx.telephony, org_id, key, wanted, ctx.settings.phone_number_pence)
    answered = answers.claimed(OPERATION, once, _bought)
    ctx.metrics.decision(OPERATION, answered.label)
    return answered.response


def _bought(result: Provision) -> dict[str, Any]:
    return {
        "phone_number": result.phone_number,
        "charged_pence": result.price_pence,
        "balance_pence": result.balance_pence,
    }
