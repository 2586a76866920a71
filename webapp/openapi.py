"""The public contract as OpenAPI 3.0, served at /openapi.json (and fuzzed by schemathesis)."""

from typing import Any

from engine import limits

AMOUNT = {"type": "integer", "minimum": 1, "maximum": limits.amount_pence_max}
ORG_ID = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"}
CALL_ID = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"}
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header", "required": True,
    "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
    "description": "Repeat a request safely: a replay returns the first response with `Idempotent-Replayed: true`; "
                   "the same key with another body is refused with 422.",
}  # fmt: skip


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

SETTINGS_PROPERTIES: dict[str, Any] = {
    "rate_pence_per_minute": {"type": "integer", "minimum": 1, "maximum": limits.rate_pence_per_minute_max},
    "overdraft_pence": {"type": "integer", "minimum": 0, "maximum": limits.amount_pence_max},
    "min_start_pence": {"type": "integer", "minimum": 1, "maximum": limits.amount_pence_max},
    "hold_block_minutes": {"type": "integer", "minimum": 1, "maximum": limits.hold_block_minutes_max},
    "grace_seconds": {"type": "integer", "minimum": 0, "maximum": limits.grace_seconds_max},
    "low_balance_threshold_pence": {"type": "integer", "minimum": 0, "maximum": limits.amount_pence_max},
    "alert_webhook_url": {"type": "string", "format": "uri", "maxLength": 2000},
    "max_concurrent_calls": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
    "forward_url": {"type": "string", "format": "uri", "maxLength": limits.url_length_max, "nullable": True,
                    "description": "The platform's own server (public addresses only); null: CREDIT_ENGINE_FORWARD_URL."},
    **{name: {"type": "string", "minLength": 1, "maxLength": limits.refusal_text_length_max, "nullable": True,
              "description": f"What a caller hears when a call is refused ({why}): printable, trimmed, never blank; "
                             "null: the engine's default sentence."}
       for name, why in (("refusal_no_credit", "not enough credit"), ("refusal_busy", "at max_concurrent_calls"),
                         ("refusal_not_set_up", "the number cannot take calls"),
                         ("refusal_try_later", "anything else"))},
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
            "code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"}}}},
    },
    "OrgCreate": {
        "type": "object", "additionalProperties": False, "required": ["org_id", "name", "rate_pence_per_minute"],
        "properties": {"org_id": ORG_ID, "name": {"type": "string", "minLength": 1, "maxLength": 200}, **SETTINGS_PROPERTIES},
    },
    "OrgChange": {
        "type": "object", "additionalProperties": False, "minProperties": 1,
        "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 200}, **SETTINGS_PROPERTIES},
    },
    "Org": {"type": "object", "properties": {"org_id": ORG_ID, "name": {"type": "string"}, **SETTINGS_PROPERTIES}},
    "TopUp": {"type": "object", "additionalProperties": False, "required": ["amount_pence"], "properties": {"amount_pence": AMOUNT}},
    "TopUpResult": {"type": "object", "properties": {
        "transaction_id": {"type": "integer"}, "balance_pence": {"type": "integer"},
        "available_pence": {"type": "integer", "nullable": True}, "applied": {"type": "boolean"}}},
    "PhoneNumberRegistration": {
        "type": "object", "additionalProperties": False, "required": ["vapi_phone_number_id", "org_id"],
        "properties": {"vapi_phone_number_id": {"type": "string", "minLength": 1, "maxLength": 128}, "org_id": ORG_ID,
                       "number": {"type": "string", "maxLength": 32}, "assistant_id": {"type": "string", "maxLength": 128}},
    },
    "Wallet": {"type": "object", "properties": {
        "org_id": ORG_ID, "balance_pence": {"type": "integer"}, "held_pence": {"type": "integer"},
        "available_pence": {"type": "integer"}, "debt_pence": {"type": "integer"}, "live_calls": {"type": "integer"},
        "currency": {"type": "string"}}},
    "Transactions": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "integer"}, "kind": {"type": "string"}, "amount_pence": {"type": "integer"},
            "balance_after_pence": {"type": "integer"}, "call_id": {"type": "string", "nullable": True},
            "idempotency_key": {"type": "string"}, "created_at": {"type": "string", "format": "date-time"}}}},
        "next_cursor": {"type": "string", "nullable": True}}},
    "Reservation": {"type": "object", "properties": {
        "call_id": CALL_ID, "hold_pence": {"type": "integer"}, "max_duration_seconds": {"type": "integer"}}},
    "Provision": {
        "type": "object", "additionalProperties": False,
        "properties": {"area_code": {"type": "string", "pattern": "^[0-9]{3}$"},
                       "assistant_id": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,128}$"}},
    },
    "Provisioned": {"type": "object", "properties": {
        "phone_number": {"type": "object", "properties": {"id": {"type": "string"}, "number": {"type": "string", "nullable": True},
                                                          "status": {"type": "string"}}},
        "charged_pence": {"type": "integer"}, "balance_pence": {"type": "integer"}}},
    "VapiEnvelope": {
        "type": "object", "required": ["message"],
        "properties": {"message": {"type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}}},
        "description": "A Vapi server message exactly as Vapi sends it.",
    },
    "StatusCheck": {
        "oneOf": [
            {"type": "object", "required": ["call_id"], "properties": {"call_id": CALL_ID}},
            ref("VapiEnvelope"),
        ],
    },
    "StatusCheckResult": {"type": "object", "required": ["endCall", "reason"], "properties": {
        "endCall": {"type": "boolean"},
        "reason": {"type": "string", "enum": ["ok", "credit_exhausted", "call_ended", "unknown_call"]},
        "balance_pence": {"type": "integer"}, "available_pence": {"type": "integer"},
        "call_cost_so_far_pence": {"type": "integer"}}},
}  # fmt: skip

ADMIN = [{"adminToken": []}]
ORG = [{"orgApiKey": []}]
VAPI = [{"vapiSecret": []}, {"vapiBearer": []}]
ORG_PATH = {"name": "org_id", "in": "path", "required": True, "schema": ORG_ID}
CALL_PATH = {"name": "call_id", "in": "path", "required": True, "schema": CALL_ID}

PATHS: dict[str, Any] = {
    "/api/admin/orgs": {"post": {
        "summary": "Create an org", "security": ADMIN, "requestBody": json_body(ref("OrgCreate")),
        "responses": {"201": answer("Created", ref("Org")), "409": answer("Exists", ref("Error")), **ERRORS}}},
    "/api/admin/orgs/{org_id}": {
        "parameters": [ORG_PATH],
        "get": {"summary": "An org's settings and wallet", "security": ADMIN,
                "responses": {"200": answer("The org", ref("Org")), "404": answer("No such org", ref("Error")), **ERRORS}},
        "patch": {"summary": "Change an org's settings", "security": ADMIN, "requestBody": json_body(ref("OrgChange")),
                  "responses": {"200": answer("The org", ref("Org")), "404": answer("No such org", ref("Error")), **ERRORS}}},
    "/api/admin/orgs/{org_id}/api-keys": {"post": {
        "summary": "Issue an API key (shown once; stored hashed)", "security": ADMIN, "parameters": [ORG_PATH],
        "responses": {"201": answer("The key", {"type": "object", "properties": {
            "key_id": {"type": "string"}, "api_key": {"type": "string"}}}), "404": answer("No such org", ref("Error")), **ERRORS}}},
    "/api/admin/orgs/{org_id}/api-keys/{key_id}": {"delete": {
        "summary": "Revoke an API key", "security": ADMIN,
        "parameters": [ORG_PATH, {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"204": {"description": "Revoked"}, "404": answer("No such key", ref("Error")), **ERRORS}}},
    "/api/admin/orgs/{org_id}/topups": {"post": {
        "summary": "Top up an org (Postgres-first)", "security": ADMIN, "parameters": [ORG_PATH, IDEMPOTENCY_KEY],
        "requestBody": json_body(ref("TopUp")),
        "responses": {"201": answer("Credited", ref("TopUpResult")), "404": answer("No such org", ref("Error")),
                      "409": answer("Same key still running", ref("Error")), **ERRORS}}},
    "/api/admin/phone-numbers": {"post": {
        "summary": "Register a number bought at Vapi to an org", "security": ADMIN,
        "requestBody": json_body(ref("PhoneNumberRegistration")),
        "responses": {"201": answer("Registered"), "404": answer("No such org", ref("Error")),
                      "409": answer("Registered to another org", ref("Error")), **ERRORS}}},
    "/api/wallet": {"get": {"summary": "The org's live balance (from Redis)", "security": ORG,
                            "responses": {"200": answer("Wallet", ref("Wallet")), **ERRORS}}},
    "/api/wallet/transactions": {"get": {
        "summary": "The org's ledger, newest first", "security": ORG,
        "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
                       {"name": "cursor", "in": "query", "schema": {"type": "string"}}],
        "responses": {"200": answer("A page", ref("Transactions")), **ERRORS}}},
    "/api/wallet/holds": {"get": {"summary": "The org's live call holds", "security": ORG,
                                  "responses": {"200": answer("Holds"), **ERRORS}}},
    "/api/alerts": {"get": {"summary": "The org's last 100 alerts and their delivery", "security": ORG,
                            "responses": {"200": answer("Alerts"), **ERRORS}}},
    "/api/alerts/signing-secret": {"get": {
        "summary": "The secret that signs the org's alert webhooks (header Credit-Engine-Signature)", "security": ORG,
        "responses": {"200": answer("The secret"), "404": answer("Alerts disabled: no signing key", ref("Error")), **ERRORS}}},
    "/api/forwarding/secret": {"get": {
        "summary": "The X-Vapi-Secret sent with what is forwarded to the org's own platform (its forward_url)", "security": ORG,
        "responses": {"200": answer("The secret"), "404": answer("No forward secret configured", ref("Error")), **ERRORS}}},
    "/api/calls/{call_id}": {"get": {
        "summary": "One of the org's calls", "security": ORG, "parameters": [CALL_PATH],
        "responses": {"200": answer("The call"), "404": answer("Not this org's call", ref("Error")), **ERRORS}}},
    "/api/calls/{call_id}/reserve": {"post": {
        "summary": "Reserve credit for an outbound call", "security": ORG, "parameters": [CALL_PATH],
        "responses": {"201": answer("Held", ref("Reservation")), "402": answer("Not enough credit", ref("Error")),
                      "409": answer("Already ended, too many calls, or another org's call", ref("Error")), **ERRORS}}},
    "/api/managed-telephony/pricing": {"get": {
        "summary": "What a phone number costs", "security": ORG,
        "responses": {"200": answer("Price", {"type": "object", "properties": {"phone_number_pence": {"type": "integer"}}}), **ERRORS}}},
    "/api/managed-telephony/provision": {"post": {
        "summary": "Buy a phone number: charge (zero-debt), buy, register; refund if the provider fails",
        "security": ORG, "parameters": [IDEMPOTENCY_KEY], "requestBody": json_body(ref("Provision")),
        "responses": {"201": answer("Bought", ref("Provisioned")), "402": answer("Not enough credit", ref("Error")),
                      "409": answer("Same key still running", ref("Error")),
                      "502": answer("Provider failed; refunded", ref("Error")), **ERRORS}}},
    "/api/vapi/webhook": {"post": {
        "summary": "Vapi server messages (assistant-request, status-update, end-of-call-report, ...)", "security": VAPI,
        "requestBody": json_body(ref("VapiEnvelope")),
        "responses": {"200": answer("Vapi's documented reply: an assistant, a spoken error, or {}"), **ERRORS}}},
    "/api/vapi/webhook/status-check": {"post": {
        "summary": "The kill switch, pulled: may this call go on?", "security": VAPI,
        "requestBody": json_body(ref("StatusCheck")),
        "responses": {"200": answer("Decision", ref("StatusCheckResult")),
                      "503": answer("Balances are being restored", ref("Error")), **ERRORS}}},
    "/healthz": {"get": {"summary": "The process is up", "responses": {"200": answer("Up")}}},
    "/readyz": {"get": {"summary": "This process can decide: Redis answers with its state rebuilt (Postgres, worker and ledger lag: in the body)",
                        "responses": {"200": answer("Ready"), "503": answer("Not ready")}}},
    "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "Metrics",
                         "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
}  # fmt: skip


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "credit-engine", "version": "0.1.0",
                 "description": "Prepaid credit for Vapi calls. Amounts are integers in pence."},
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer", "description": "CREDIT_ENGINE_ADMIN_TOKEN"},
                "orgApiKey": {"type": "http", "scheme": "bearer", "description": "An org API key from the admin API"},
                "vapiSecret": {"type": "apiKey", "in": "header", "name": "X-Vapi-Secret"},
                "vapiBearer": {"type": "http", "scheme": "bearer", "description": "VAPI_WEBHOOK_SECRET as a bearer token"},
            },
        },
    }  # fmt: skip
