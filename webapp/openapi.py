"""The public contract as OpenAPI 3.0, served at /openapi.json (and fuzzed by schemathesis)."""

from typing import Any

from credit_engine.engine import limits
from credit_engine.engine import org_setting_table as table

AMOUNT = {"type": "integer", "minimum": 1, "maximum": limits.amount_pence_max}
ORG_ID = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"}
CALL_ID = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": True,
    "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
    "description": "Repeat a request safely: a replay returns the first response with `Idempotent-Replayed: true`; "
    "the same key with another body is refused with 422.",
}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def answer(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    if schema is None:
        return {"description": description}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERRORS = {
    "400": answer("Malformed request", ref("Error")),
    "401": answer("Missing or wrong credentials", ref("Error")),
    "413": answer("Body too large", ref("Error")),
    "415": answer("Not JSON", ref("Error")),
    "422": answer("A field is wrong (the error names it)", ref("Error")),
}

INTEGER = {"type": "integer"}
TEXT = {"type": "string"}
TIME = {"type": "string", "format": "date-time"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


def closed(properties: dict[str, Any], *, optional: tuple[str, ...] = (), description: str = "") -> dict[str, Any]:
    """A response object: these properties and no others, each one always sent unless named optional.
    Closed, so a field a handler starts sending without documenting it here fails
    tests/webapp/test_openapi_contract.py and schemathesis's response_schema_conformance check."""
    assert set(optional) <= set(properties)
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    required = [name for name in properties if name not in optional]
    if required:
        schema["required"] = required
    if description:
        schema["description"] = description
    return schema


def error_schema(**details: dict[str, Any]) -> dict[str, Any]:
    """`{"error": {"code", "message", ...}}` (webapp/responses.py): with details, an error that
    always carries them; without, one that may name the `field` at fault."""
    if details:
        return closed({"error": closed({"code": TEXT, "message": TEXT, **details})})
    return closed({"error": closed({"code": TEXT, "message": TEXT, "field": TEXT}, optional=("field",))})


def setting_schema(setting: table.Setting) -> dict[str, Any]:
    """A setting in a request, as engine/org_setting_table.py declares it: its kind and bounds,
    and null (back to the default) where it may be unset."""
    schema: dict[str, Any]
    if setting.kind == "integer":
        schema = {"type": "integer", "minimum": setting.minimum, "maximum": setting.maximum}
    elif setting.kind == "url":
        schema = {"type": "string", "format": "uri", "maxLength": setting.maximum}
    else:  # a sentence: printable, trimmed, never blank
        schema = {"type": "string", "minLength": setting.minimum, "maxLength": setting.maximum}
    schema["description"] = setting.help[0].upper() + setting.help[1:] + "."
    return nullable(schema) if setting.unsettable else schema


def setting_shown(setting: table.Setting) -> dict[str, Any]:
    """A setting as responses show it: null where the org left it unset (min_start_pence shows the
    value in force), and a URL as it was saved, so no `format` (the engine's URL rule is not RFC
    3986's)."""
    shown = {key: value for key, value in setting_schema(setting).items() if key not in ("format", "nullable")}
    return nullable(shown) if setting.unsettable and not setting.shown_in_force else shown


SETTINGS_PROPERTIES = {setting.name: setting_schema(setting) for setting in table.SETTINGS}
SETTINGS_SHOWN = {setting.name: setting_shown(setting) for setting in table.SETTINGS}
ORG_PROPERTIES = {"org_id": ORG_ID, "name": TEXT, **SETTINGS_SHOWN, "created_at": TIME, "updated_at": TIME}
# One wallet shape (webapp/wallet.wallet_json): the admin's view of an org carries it as `wallet`,
# GET /api/wallet between the org's id and its currency.
WALLET_PROPERTIES = {
    "balance_pence": INTEGER,
    "held_pence": INTEGER,
    "available_pence": INTEGER,
    "debt_pence": INTEGER,
    "live_calls": INTEGER,
}
HOLD_PROPERTIES = {
    "call_id": TEXT,
    "hold_pence": INTEGER,
    "rate_pence_per_minute": INTEGER,
    "created_at": TIME,
    "started_at": nullable(TIME),
    "ended_at": nullable(TIME),
    "expires_at": TIME,
    "max_duration_seconds": INTEGER,
}

SCHEMAS: dict[str, Any] = {
    "Error": error_schema(),
    "InsufficientBalanceError": error_schema(required_pence=INTEGER, available_pence=INTEGER),
    "ProviderFailedError": error_schema(refunded_pence=INTEGER, refund_transaction_id=INTEGER),
    "CallShortError": error_schema(available_pence=INTEGER),
    "VapiRefusedError": error_schema(vapi_status=INTEGER),
    "VapiNoAnswerError": error_schema(reservation_id=TEXT),
    "PlaceCall": {
        "type": "object",
        "additionalProperties": False,
        "required": ["phone_number_id", "customer"],
        "description": "Exactly one of assistant_id and assistant. The engine merges its own part into "
        "assistant_overrides (its server, serverMessages, monitorPlan.controlEnabled, maxDurationSeconds "
        "from the credit, variableValues.org_id and credit_engine_reservation_id).",
        "properties": {
            "phone_number_id": {
                "type": "string",
                "pattern": "^[A-Za-z0-9_.:-]{1,128}$",
                "description": "A Vapi phone number registered to this org",
            },
            "customer": {
                "type": "object",
                "required": ["number"],
                "description": "Vapi's CreateCustomerDTO",
                "properties": {"number": {"type": "string", "pattern": "^\\+[1-9][0-9]{6,14}$"}},
            },
            "assistant_id": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,128}$"},
            "assistant": {"type": "object", "minProperties": 1, "description": "Vapi's CreateAssistantDTO"},
            "assistant_overrides": {"type": "object", "description": "Vapi's AssistantOverrides"},
            "name": {"type": "string", "minLength": 1, "maxLength": 40},
        },
    },
    "PlacedCall": closed(
        {"call_id": CALL_ID, "hold_pence": INTEGER, "max_duration_seconds": INTEGER, "status": TEXT},
        description="The call as Vapi placed it, held under Vapi's call id; status is Vapi's (queued), "
        "or unknown when a retry answers from the engine's own record",
    ),
    "OrgCreate": {
        "type": "object",
        "additionalProperties": False,
        "required": ["org_id", "name", *(setting.name for setting in table.SETTINGS if setting.required)],
        "properties": {
            "org_id": ORG_ID,
            "name": {"type": "string", "minLength": 1, "maxLength": 200},
            **SETTINGS_PROPERTIES,
        },
    },
    "OrgChange": {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 200}, **SETTINGS_PROPERTIES},
    },
    "Org": closed(ORG_PROPERTIES),
    "OrgView": closed(
        {**ORG_PROPERTIES, "wallet": ref("WalletState")},
        optional=("wallet",),
        description="`wallet` is absent while Redis does not hold the org (it is being restored).",
    ),
    "WalletState": closed(WALLET_PROPERTIES, description="An org's money and live calls at one instant (Redis)."),
    "Wallet": closed({"org_id": ORG_ID, **WALLET_PROPERTIES, "currency": TEXT}),
    "ApiKey": closed({"key_id": TEXT, "api_key": TEXT}),
    "TopUp": {
        "type": "object",
        "additionalProperties": False,
        "required": ["amount_pence"],
        "properties": {"amount_pence": AMOUNT},
    },
    "TopUpResult": closed(
        {
            "transaction_id": INTEGER,
            "balance_pence": INTEGER,
            "applied": {"type": "boolean"},
            "available_pence": nullable(INTEGER),
        },
        description="`available_pence` is null while Redis has not applied the ledger's credit.",
    ),
    "PhoneNumberRegistration": {
        "type": "object",
        "additionalProperties": False,
        "required": ["vapi_phone_number_id", "org_id"],
        "properties": {
            "vapi_phone_number_id": {"type": "string", "minLength": 1, "maxLength": 128},
            "org_id": ORG_ID,
            "number": {"type": "string", "maxLength": 32},
            "assistant_id": {"type": "string", "maxLength": 128},
        },
    },
    "PhoneNumber": closed(
        {
            "vapi_phone_number_id": TEXT,
            "org_id": ORG_ID,
            "number": nullable(TEXT),
            "assistant_id": nullable(TEXT),
            "status": TEXT,
        }
    ),
    "Transaction": closed(
        {
            "id": INTEGER,
            "kind": TEXT,
            "amount_pence": INTEGER,
            "debt_delta_pence": INTEGER,
            "balance_after_pence": INTEGER,
            "call_id": nullable(TEXT),
            "idempotency_key": TEXT,
            "created_at": TIME,
        }
    ),
    "Transactions": closed({"items": {"type": "array", "items": ref("Transaction")}, "next_cursor": nullable(TEXT)}),
    "Hold": closed(HOLD_PROPERTIES),
    "Holds": closed({"items": {"type": "array", "items": ref("Hold")}}),
    "Call": {"oneOf": [ref("LiveCall"), ref("ResolvedCall")]},
    "LiveCall": closed({"status": {"type": "string", "enum": ["live"]}, **HOLD_PROPERTIES}),
    "ResolvedCall": closed(
        {
            "call_id": TEXT,
            "status": {"type": "string", "enum": ["committed", "released", "expired"]},
            "charged_pence": nullable(INTEGER),
            "billed_seconds": nullable(INTEGER),
        }
    ),
    "Reservation": closed(
        {"call_id": CALL_ID, "hold_pence": INTEGER, "max_duration_seconds": INTEGER, "available_pence": INTEGER}
    ),
    "Alert": closed(
        {
            "id": TEXT,
            "type": TEXT,
            "call_id": nullable(TEXT),
            "status": TEXT,
            "attempts": INTEGER,
            "last_error": nullable(TEXT),
            "created_at": TIME,
            "delivered_at": nullable(TIME),
        }
    ),
    "Alerts": closed({"alerts": {"type": "array", "items": ref("Alert")}}),
    "AlertSigningSecret": closed({"signing_secret": TEXT, "header": TEXT, "scheme": TEXT}),
    "ForwardSecret": closed({"secret": TEXT, "header": TEXT}),
    "Pricing": closed({"phone_number_pence": INTEGER, "currency": TEXT}),
    "Provision": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "area_code": {"type": "string", "pattern": "^[0-9]{3}$"},
            "assistant_id": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,128}$"},
        },
    },
    "Provisioned": closed(
        {
            "phone_number": closed({"id": TEXT, "number": nullable(TEXT), "status": TEXT}),
            "charged_pence": INTEGER,
            "balance_pence": INTEGER,
        }
    ),
    "VapiEnvelope": {
        "type": "object",
        "required": ["message"],
        "properties": {"message": {"type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}}},
        "description": "A Vapi server message exactly as Vapi sends it.",
    },
    # Open by design, the one response object that is: Vapi's schema, and for the messages the
    # org's platform answers (tool calls, transfers, handoffs, its own assistant-request logic),
    # the platform's answer relayed as it gave it.
    "VapiReply": {
        "type": "object",
        "description": "Vapi's documented reply: an assistant (`assistantId`, `assistantOverrides`), a spoken refusal "
        "(`error`), `{}`, or the org's platform's own answer with the engine's part merged in.",
    },
    "StatusCheck": {
        "oneOf": [
            {"type": "object", "required": ["call_id"], "properties": {"call_id": CALL_ID}},
            ref("VapiEnvelope"),
        ],
    },
    "StatusCheckResult": closed(
        {
            "endCall": {"type": "boolean"},
            "reason": {"type": "string", "enum": ["ok", "credit_exhausted", "call_ended", "unknown_call"]},
            "balance_pence": INTEGER,
            "available_pence": INTEGER,
            "call_cost_so_far_pence": INTEGER,
        }
    ),
    "Health": closed({"status": {"type": "string", "enum": ["ok"]}}),
    "Readiness": closed(
        {
            "status": {"type": "string", "enum": ["ready", "not_ready"]},
            "degraded": {
                "type": "array",
                "items": {"type": "string", "enum": ["postgres", "outbox"]},
                "description": "What is not well but does not stop this process deciding",
            },
            "checks": closed(
                {"redis": TEXT, "postgres": TEXT, "state": TEXT, "outbox_lag_ms": nullable(INTEGER), "outbox": TEXT},
                optional=("outbox_lag_ms", "outbox"),
                description="`outbox_lag_ms` and `outbox` only when Redis answers; `outbox_lag_ms` is null "
                "until a worker has reported.",
            ),
        }
    ),
}

Security = list[dict[str, list[str]]]
ADMIN: Security = [{"adminToken": []}]
ORG: Security = [{"orgApiKey": []}]
VAPI: Security = [{"vapiSecret": []}, {"vapiBearer": []}]
ORG_PATH = {"name": "org_id", "in": "path", "required": True, "schema": ORG_ID}
CALL_PATH = {"name": "call_id", "in": "path", "required": True, "schema": CALL_ID}

PATHS: dict[str, Any] = {
    "/api/admin/orgs": {
        "post": {
            "summary": "Create an org",
            "security": ADMIN,
            "requestBody": json_body(ref("OrgCreate")),
            "responses": {"201": answer("Created", ref("Org")), "409": answer("Exists", ref("Error")), **ERRORS},
        }
    },
    "/api/admin/orgs/{org_id}": {
        "parameters": [ORG_PATH],
        "get": {
            "summary": "An org's settings and wallet",
            "security": ADMIN,
            "responses": {
                "200": answer("The org", ref("OrgView")),
                "404": answer("No such org", ref("Error")),
                **ERRORS,
            },
        },
        "patch": {
            "summary": "Change an org's settings",
            "security": ADMIN,
            "requestBody": json_body(ref("OrgChange")),
            "responses": {"200": answer("The org", ref("Org")), "404": answer("No such org", ref("Error")), **ERRORS},
        },
    },
    "/api/admin/orgs/{org_id}/api-keys": {
        "post": {
            "summary": "Issue an API key (shown once; stored hashed)",
            "security": ADMIN,
            "parameters": [ORG_PATH],
            "responses": {
                "201": answer("The key", ref("ApiKey")),
                "404": answer("No such org", ref("Error")),
                **ERRORS,
            },
        }
    },
    "/api/admin/orgs/{org_id}/api-keys/{key_id}": {
        "delete": {
            "summary": "Revoke an API key",
            "security": ADMIN,
            "parameters": [ORG_PATH, {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"204": {"description": "Revoked"}, "404": answer("No such key", ref("Error")), **ERRORS},
        }
    },
    "/api/admin/orgs/{org_id}/topups": {
        "post": {
            "summary": "Top up an org (Postgres-first)",
            "security": ADMIN,
            "parameters": [ORG_PATH, IDEMPOTENCY_KEY],
            "requestBody": json_body(ref("TopUp")),
            "responses": {
                "201": answer("Credited", ref("TopUpResult")),
                "404": answer("No such org", ref("Error")),
                "409": answer("Same key still running", ref("Error")),
                **ERRORS,
            },
        }
    },
    "/api/admin/phone-numbers": {
        "post": {
            "summary": "Register a number bought at Vapi to an org",
            "security": ADMIN,
            "requestBody": json_body(ref("PhoneNumberRegistration")),
            "responses": {
                "201": answer("Registered", ref("PhoneNumber")),
                "404": answer("No such org", ref("Error")),
                "409": answer("Registered to another org", ref("Error")),
                **ERRORS,
            },
        }
    },
    "/api/wallet": {
        "get": {
            "summary": "The org's live balance (from Redis)",
            "security": ORG,
            "responses": {"200": answer("Wallet", ref("Wallet")), **ERRORS},
        }
    },
    "/api/wallet/transactions": {
        "get": {
            "summary": "The org's ledger, newest first",
            "security": ORG,
            "parameters": [
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
                {"name": "cursor", "in": "query", "schema": {"type": "string"}},
            ],
            "responses": {"200": answer("A page", ref("Transactions")), **ERRORS},
        }
    },
    "/api/wallet/holds": {
        "get": {
            "summary": "The org's live call holds",
            "security": ORG,
            "responses": {"200": answer("Holds", ref("Holds")), **ERRORS},
        }
    },
    "/api/alerts": {
        "get": {
            "summary": "The org's last 100 alerts and their delivery",
            "security": ORG,
            "responses": {"200": answer("Alerts", ref("Alerts")), **ERRORS},
        }
    },
    "/api/alerts/signing-secret": {
        "get": {
            "summary": "The secret that signs the org's alert webhooks (header Credit-Engine-Signature)",
            "security": ORG,
            "responses": {
                "200": answer("The secret", ref("AlertSigningSecret")),
                "404": answer("Alerts disabled: no signing key", ref("Error")),
                **ERRORS,
            },
        }
    },
    "/api/forwarding/secret": {
        "get": {
            "summary": "The X-Vapi-Secret sent with what is forwarded to the org's own platform (its forward_url)",
            "security": ORG,
            "responses": {
                "200": answer("The secret", ref("ForwardSecret")),
                "404": answer("No forward secret configured", ref("Error")),
                **ERRORS,
            },
        }
    },
    "/api/calls": {
        "post": {
            "summary": "Place an outbound call through the engine: reserve, place it at Vapi with the engine as its "
            "server, hold it under Vapi's call id",
            "security": ORG,
            "parameters": [IDEMPOTENCY_KEY],
            "requestBody": json_body(ref("PlaceCall")),
            "responses": {
                "201": answer("Placed", ref("PlacedCall")),
                "402": answer("Not enough credit: nothing reserved, no call placed", ref("CallShortError")),
                "404": answer("No such active phone number for this org", ref("Error")),
                "409": answer("Same key still running", ref("Error")),
                "429": answer("The org is at its limit of concurrent calls", ref("Error")),
                "502": answer("Vapi refused or failed: the hold released", ref("VapiRefusedError")),
                "503": answer("No VAPI_API_KEY, balances being restored, or the ledger behind", ref("Error")),
                "504": answer(
                    "Vapi did not answer: the hold kept until the call reports or expires", ref("VapiNoAnswerError")
                ),
                **ERRORS,
            },
        }
    },
    "/api/calls/{call_id}": {
        "get": {
            "summary": "One of the org's calls",
            "security": ORG,
            "parameters": [CALL_PATH],
            "responses": {
                "200": answer("The call", ref("Call")),
                "404": answer("Not this org's call", ref("Error")),
                **ERRORS,
            },
        }
    },
    "/api/calls/{call_id}/reserve": {
        "post": {
            "summary": "Reserve credit for an outbound call",
            "security": ORG,
            "parameters": [CALL_PATH],
            "responses": {
                "201": answer("Held", ref("Reservation")),
                "402": answer("Not enough credit", ref("Error")),
                "409": answer("Already ended, too many calls, or another org's call", ref("Error")),
                **ERRORS,
            },
        }
    },
    "/api/managed-telephony/pricing": {
        "get": {
            "summary": "What a phone number costs",
            "security": ORG,
            "responses": {"200": answer("Price", ref("Pricing")), **ERRORS},
        }
    },
    "/api/managed-telephony/provision": {
        "post": {
            "summary": "Buy a phone number: charge (zero-debt), buy, register; refund if the provider fails",
            "security": ORG,
            "parameters": [IDEMPOTENCY_KEY],
            "requestBody": json_body(ref("Provision")),
            "responses": {
                "201": answer("Bought", ref("Provisioned")),
                "402": answer("Not enough credit", ref("InsufficientBalanceError")),
                "409": answer("Same key still running", ref("Error")),
                "502": answer("Provider failed; refunded", ref("ProviderFailedError")),
                **ERRORS,
            },
        }
    },
    "/api/vapi/webhook": {
        "post": {
            "summary": "Vapi server messages (assistant-request, status-update, end-of-call-report, ...)",
            "security": VAPI,
            "requestBody": json_body(ref("VapiEnvelope")),
            "responses": {"200": answer("Vapi's documented reply", ref("VapiReply")), **ERRORS},
        }
    },
    "/api/vapi/webhook/status-check": {
        "post": {
            "summary": "The kill switch, pulled: may this call go on?",
            "security": VAPI,
            "requestBody": json_body(ref("StatusCheck")),
            "responses": {
                "200": answer("Decision", ref("StatusCheckResult")),
                "503": answer("Balances are being restored", ref("Error")),
                **ERRORS,
            },
        }
    },
    "/healthz": {"get": {"summary": "The process is up", "responses": {"200": answer("Up", ref("Health"))}}},
    "/readyz": {
        "get": {
            "summary": "This process can decide: Redis answers with its state rebuilt (Postgres, worker "
            "and ledger lag: reported in the body, never in the status)",
            "responses": {"200": answer("Ready", ref("Readiness")), "503": answer("Not ready", ref("Readiness"))},
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics",
            "responses": {"200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}},
        }
    },
}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "credit-engine",
            "version": "0.1.0",
            "description": "Prepaid credit for Vapi calls. Amounts are integers in pence.",
        },
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer", "description": "CREDIT_ENGINE_ADMIN_TOKEN"},
                "orgApiKey": {"type": "http", "scheme": "bearer", "description": "An org API key from the admin API"},
                "vapiSecret": {"type": "apiKey", "in": "header", "name": "X-Vapi-Secret"},
                "vapiBearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "VAPI_WEBHOOK_SECRET as a bearer token",
                },
            },
        },
    }
