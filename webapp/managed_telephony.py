"""Phone-number provisioning (org API key): the price, and buying a number with it."""

import re

from starlette.requests import Request
from starlette.responses import Response

from credit_engine.engine.provisioning import ProvisionRequest, provision
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
    response = await provision(ctx.rt, ctx.telephony, org_id, key, wanted, ctx.settings.phone_number_pence)
    error = response.body.get("error") if isinstance(response.body, dict) else None
    ctx.metrics.decision("provision", error["code"] if isinstance(error, dict) else str(response.status))
    headers = {"Idempotent-Replayed": "true"} if response.replayed else None
    return json_response(response.body, response.status, headers=headers)
