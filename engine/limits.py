"""Named limits for every amount, queue, batch, loop and retry, with their relations checked.

Units go last in names (`_pence`, `_ms`, `_s`). Everything stored in Redis is in ms; the few
human-configured durations are in seconds and converted once, at the configuration boundary.
"""

# Money. Lua numbers are doubles: every amount and every sum stays far below 2**53 so that
# integer arithmetic in the scripts is exact.
amount_pence_max = 10**12  # one request moves at most £10bn
balance_pence_max = 10**13  # a credit that would take a balance above this is refused
rate_pence_per_minute_max = 10**6
billed_seconds_max = 7 * 24 * 60 * 60  # a call report longer than a week is bad input
lua_integer_exact_max = 2**53

# Calls. Vapi accepts maxDurationSeconds in 10..43200.
max_duration_s_min = 10
max_duration_s_max = 43_200
hold_block_minutes_max = 60
grace_seconds_max = 300
concurrent_calls_max = 1_000_000  # an org's max_concurrent_calls
extensions_per_check_max = 8  # blocks one kill-switch check may add to a hold

# Idempotency: a replay must outlive the hold it replays.
idempotency_ttl_ms_default = 7 * 24 * 60 * 60 * 1000
idem_prune_per_call_max = 8  # expired idempotency records a script removes as it passes

# Holds: a hold whose call never reports expires this long after its funded time ran out.
hold_report_slack_ms_default = 10 * 60 * 1000

# Outbox (Redis stream per org, drained by the worker into the Postgres ledger).
outbox_per_org_max_default = 100_000  # fail closed above this: no decision without a ledger
settle_batch_size_max = 2_000  # entries per Postgres transaction (500: ~11k entries/s here, 2,000: ~20k)
settle_orgs_per_batch_max = 128  # orgs popped from the doorbell set per batch
outbox_sweep_page_size = 1_000  # orgs per XLEN pipeline when sweeping for stranded entries

# Request bodies: jsonb and orjson's writer go deeper, but no request of ours needs more.
json_depth_max = 64

# Identifiers and keys.
org_id_length_max = 64
call_id_length_max = 128
idempotency_key_length_max = 255

# Org settings the webhook reads (engine/org_profiles.py): kept per process, never in Redis.
refusal_text_length_max = 500  # a spoken refusal, trimmed; Vapi speaks "Unknown Error" for an empty one
url_length_max = 2_000  # alert_webhook_url, forward_url
org_profile_cache_ttl_s = 10.0  # another process's change to an org is seen within this
org_profile_cache_size_max = 10_000  # orgs whose profiles one process keeps (least recently used go first)
org_profile_read_s_max = 1.0  # a profile read from Postgres; past it a refusal is spoken in the default words

# Reconciler.
reconcile_page_size = 500  # orgs per Postgres page and Redis pipeline
reconcile_check_attempts_max = 5  # re-reads when an org changes while being compared
rebuild_lock_ttl_ms = 5 * 60 * 1000

# Vapi's REST API, for `credit-engine vapi import|connect|check` (engine/vapi_account.py).
vapi_numbers_page_size = 1_000  # GET /phone-number?limit=: Vapi's maximum (its default is 100)
vapi_numbers_pages_max = 100  # 100,000 numbers; a bigger account is refused, never half-listed
vapi_request_timeout_s = 10.0
vapi_create_call_timeout_s = 10.0  # POST /call: asked once (no retry could tell a second call from the first)
vapi_request_attempts_max = 3  # a 429, a 5xx or a transport error is tried again, after a backoff
vapi_retry_after_s_max = 10.0  # the longest Retry-After honoured
vapi_assistants_checked_max = 100  # `vapi check` looks up at most this many distinct assistants
vapi_workflows_remembered_max = 1_000  # saved workflows a platform answered with, newest kept (call_server)
vapi_workflows_checked_max = 100  # `vapi check` looks up at most this many of them, newest first
public_url_probe_timeout_s = 5.0  # `vapi check`: GET <CREDIT_ENGINE_PUBLIC_URL>/healthz
# Vapi's records of calls (engine/settle.py, engine/audit.py): lookups paced per second, shared by
# every process through Redis (CREDIT_ENGINE_VAPI_API_RPS within these bounds).
vapi_api_rps_default = 5
vapi_api_rps_max = 100
vapi_pace_wait_slots_max = 10_000  # slots a request may wait for before giving up (at 1/s: under 3 h)
vapi_calls_page_size = 1_000  # GET /call?limit=
vapi_calls_pages_max = 1_000  # a window of more than 1,000,000 calls is refused, never half-audited
settle_report_grace_s = 60  # a silent hold is looked up this long after its report was due
settle_recheck_s = 60  # a call Vapi says is running (or could not answer for) is looked up again after this
audit_unknown_lookups_max = 10_000  # billed calls missing from Vapi's listing, each confirmed by GET /call/{id}
audit_mismatches_alerted_max = 20  # call ids named in one org's audit alert

# Settings the scripts receive as arguments: the configuration (engine/config.py) reads each within
# these bounds, and the scripts refuse anything outside them (SCRIPT_ARGS).
hold_report_slack_s_max = 24 * 60 * 60
outbox_per_org_max_max = 10**8
kill_warn_lead_s_max = 60 * 60
kill_attempts_max_max = 100
kill_backoff_ms_max = 60 * 60 * 1000
kill_recheck_s_max = 60 * 60
restore_epoch_max = 2**48  # an org's restore epoch (milliseconds since 1970, far into the future)
lua_integer_max = lua_integer_exact_max - 1

# Every integer argument the scripts check with int_arg that is not an org setting (those are bounded by
# engine/org_setting_table.py) -> (min, max), as each script's `int_arg(ARGV[i], name, min, max)`
# spells it: tests/lua/test_script_args.py reads every int_arg in lua/ and fails on a bound that
# differs from this table, or on an argument in neither table.
SCRIPT_ARGS: dict[str, tuple[int, int]] = {
    "amount_pence": (1, amount_pence_max),
    "billed_seconds": (0, billed_seconds_max),
    "balance_pence": (-balance_pence_max, balance_pence_max),
    "debt_pence": (0, balance_pence_max),
    "now_ms": (0, lua_integer_max),
    "idempotency_ttl_ms": (1, lua_integer_max),
    "expected_seq": (0, lua_integer_max),
    "epoch": (1, restore_epoch_max),
    "holds_count": (0, concurrent_calls_max),
    "outbox_max": (1, outbox_per_org_max_max),
    "report_slack_ms": (0, hold_report_slack_s_max * 1000),
    "mode": (0, 2),  # hold_reserve: an assistant-request, a reservation, a call first seen running
    "direct_billing": (0, 1),
    "warn_lead_ms": (0, kill_warn_lead_s_max * 1000),
    "attempts_max": (1, kill_attempts_max_max),
    "backoff_base_ms": (1, kill_backoff_ms_max),
    "backoff_max_ms": (1, kill_backoff_ms_max),
    "recheck_ms": (1000, kill_recheck_s_max * 1000),
}
# Constants the scripts spell as literals, checked by the same test.
SCRIPT_CONSTANTS = {
    "MAX_DURATION_S_MIN": max_duration_s_min,
    "MAX_DURATION_S_MAX": max_duration_s_max,
    "IDEM_PRUNE_MAX": idem_prune_per_call_max,
}

assert max_duration_s_max * rate_pence_per_minute_max < lua_integer_exact_max
assert billed_seconds_max * rate_pence_per_minute_max < lua_integer_exact_max
assert balance_pence_max + amount_pence_max < lua_integer_exact_max
assert idempotency_ttl_ms_default > max_duration_s_max * 1000 + hold_report_slack_ms_default
assert settle_orgs_per_batch_max <= settle_batch_size_max
assert 1 <= vapi_numbers_page_size <= 1_000  # Vapi refuses a `limit` above 1,000
assert 1 <= vapi_calls_page_size <= 1_000
assert 1 <= vapi_api_rps_default <= vapi_api_rps_max
assert settle_report_grace_s * 1000 < hold_report_slack_ms_default  # looked up well before it expires
assert org_profile_read_s_max < 5.0  # well inside the assistant-request budget (webapp/vapi.py)
