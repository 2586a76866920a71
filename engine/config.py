"""Settings: one frozen dataclass per process, built once from the environment.

Human-configured durations are in seconds in the environment and converted to ms here, once.
"""

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlsplit

from credit_engine.engine import limits
from credit_engine.engine.logs import LOG_FORMATS, LOG_LEVELS


class ConfigError(ValueError):
    pass


def _int(env: Mapping[str, str], name: str, default: int, minimum: int, maximum: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be in {minimum}..{maximum}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise ConfigError(f"{name} must be 1 or 0 (true/false), got {raw!r}")


def _public_url(env: Mapping[str, str], name: str) -> str | None:
    raw = (env.get(name) or "").strip().rstrip("/")
    if not raw:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.fragment or parts.query:
        raise ConfigError(f"{name} must be an http(s) URL like https://credit.example.com, got {raw!r}")
    return raw


def _forward_url(env: Mapping[str, str], name: str) -> str | None:
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    from credit_engine.engine.outbound import parse_url  # the parser the sender uses (httpx's), imported only when set

    parsed = parse_url(raw) if len(raw) <= limits.url_length_max and raw.isprintable() and " " not in raw else None
    if parsed is None or parsed.fragment or (parsed.port is not None and not 1 <= parsed.port <= 65_535):
        raise ConfigError(
            f"{name} must be the platform's server URL, like https://platform.example.com/vapi "
            f"(http(s), at most {limits.url_length_max} characters), got {raw[:100]!r}"
        )
    return raw


header_secret_length_max = 1_000


def _header_secret(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name) or ""
    if not raw:
        return None
    if len(raw) > header_secret_length_max or any(not 0x21 <= ord(char) <= 0x7E for char in raw):
        # The secret itself is never echoed.
        raise ConfigError(
            f"{name} must be 1-{header_secret_length_max} visible ASCII characters (it is sent as a "
            f"header), got {len(raw)} characters"
        )
    return raw


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower() or default
    if raw not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


HOST_ENTRY_PATTERN = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:[0-9]{1,5})?")


def _codes(env: Mapping[str, str], name: str, default: frozenset[str]) -> frozenset[str]:
    raw = env.get(name)
    return default if raw is None else frozenset(code for code in raw.split(",") if code)


def _hosts(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    hosts = tuple(part.strip().lower() for part in raw.split(",") if part.strip())
    for host in hosts:
        if HOST_ENTRY_PATTERN.fullmatch(host) is None:
            raise ConfigError(f"{name} must be comma-separated host names (optionally host:port), got {host!r}")
    return hosts


@dataclass(frozen=True)
class Settings:
    redis_url: str | None = None  # None: `credit-engine up` starts an embedded Redis
    database_url: str | None = None  # None: `credit-engine up` starts an embedded Postgres
    redis_cluster: bool = False  # REDIS_URL is one node of a Redis Cluster (the client finds the rest)
    arq_redis_url: str | None = None  # arq's job bookkeeping; None: REDIS_URL (a cluster needs its own, see arq_url)
    key_prefix: str = "ce"
    data_dir: Path = Path(".credit-engine")  # a Path is immutable: one default, shared safely
    redis_appendfsync: str = "everysec"  # embedded Redis: always | everysec | no
    pg_user: str | None = None  # as root, the embedded Postgres runs as this user; None: pgserver, else postgres
    idempotency_ttl_ms: int = limits.idempotency_ttl_ms_default
    hold_report_slack_ms: int = limits.hold_report_slack_ms_default
    outbox_per_org_max: int = limits.outbox_per_org_max_default
    pg_pool_size: int = 10
    redis_pool_size: int = 64
    worker_poll_interval_ms: int = 20
    worker_drain_loops: int = 2
    worker_sweep_interval_s: int = 15
    worker_expire_interval_s: int = 5
    worker_health_check_interval_s: int = 5
    worker_metrics_port: int = 9464  # the worker's own /metrics; 0: not served
    worker_metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (one object per line, for log shippers)
    # HTTP API
    admin_token: str | None = None  # None: the admin API refuses everyone
    vapi_webhook_secret: str | None = None  # X-Vapi-Secret / Bearer; None: webhooks refuse everyone
    vapi_hmac_secret: str | None = None  # HMAC credential; None: the webhook secret is used
    vapi_hmac_tolerance_s: int = 300
    phone_number_pence: int = 1000
    phone_number_rent_pence: int = 1000  # each month after the one it was bought in
    rent_grace_days: int = 7  # unpaid this long into the month: suspended
    rent_release_days: int = 30  # unpaid this long into the month: released at the provider
    vapi_api_key: str | None = None  # None: phone numbers come from the fake provider
    vapi_base_url: str = "https://api.vapi.ai"
    vapi_api_rps: int = limits.vapi_api_rps_default  # GET /call lookups a second (settle, audit), all processes
    default_assistant_id: str | None = None  # for numbers registered without an assistant
    fake_provider_failing_area_codes: frozenset[str] = frozenset({"999"})
    readiness_outbox_lag_s_max: int = 60
    idempotent_claim_stale_s: int = 60  # a request silent this long under its Idempotency-Key may be taken over
    api_body_bytes_max: int = 16 * 1024
    webhook_body_bytes_max: int = 2 * 1024 * 1024  # end-of-call reports carry transcripts
    # Kill switch (engine/killswitch.py): push warnings and end-calls to calls' control URLs.
    kill_warn_lead_ms: int = 30_000
    kill_warning_text: str = "Your account is almost out of credit, so this call will end in a moment."
    kill_attempts_max: int = 5
    kill_backoff_base_ms: int = 1_000
    kill_backoff_max_ms: int = 16_000
    kill_recheck_ms: int = 30_000
    kill_poll_interval_ms: int = 200
    kill_pushes_in_flight_max: int = 256  # control-URL POSTs one worker has under way at once
    kill_push_deadline_ms: int = 900  # one POST, from being handed out (slot wait included); < kill_backoff_base_ms
    kill_end_queue_ttl_ms: int = (
        60 * 60 * 1000
    )  # an entry of the end queue (calls no org holds) is forgotten after this
    vapi_control_base_url: str | None = None  # replaces a control URL's scheme and host (a proxy, a test's fake Vapi)
    vapi_control_token: str | None = None  # Bearer token when monitorPlan.controlAuthenticationEnabled
    # Where Vapi reaches this engine (https://credit.example.com): every admitted call names the
    # engine as its server (engine/call_server.py). None: calls may bypass the engine.
    public_url: str | None = None
    vapi_credential_id: str | None = None  # the Vapi credential Vapi authenticates to us with
    # A live call no org admitted (engine/attribution.py) bills nobody: "end" ends it through its
    # control URL, "allow" lets it run (the platform pays Vapi for it).
    unattributed_calls: str = "end"
    # The platform's own server for orgs without a `forward_url` of their own, and the secret the
    # engine sends it as `X-Vapi-Secret` (as Vapi does to its servers). None: no default server.
    forward_url: str | None = None
    forward_secret: str | None = None
    control_url_hosts: tuple[str, ...] = ("vapi.ai",)  # a control URL must be https on one of these (or a subdomain)
    # Alerts to orgs' webhooks (engine/alerts.py), signed with a per-org key derived from this.
    alert_signing_key: str | None = None  # None: alerts are not sent (they wait in alert_events)
    alert_attempts_max: int = 8
    alert_backoff_base_ms: int = 2_000
    # Outbound calls to URLs orgs chose (engine/outbound.py). True: internal addresses allowed (dev, tests).
    outbound_allow_private: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        appendfsync = env.get("CREDIT_ENGINE_REDIS_APPENDFSYNC", cls.redis_appendfsync)
        if appendfsync not in ("always", "everysec", "no"):
            raise ConfigError("CREDIT_ENGINE_REDIS_APPENDFSYNC must be always, everysec or no")
        settings = cls(
            redis_url=env.get("REDIS_URL") or None,
            database_url=env.get("DATABASE_URL") or None,
            redis_cluster=_bool(env, "CREDIT_ENGINE_REDIS_CLUSTER"),
            arq_redis_url=env.get("CREDIT_ENGINE_ARQ_REDIS_URL") or None,
            key_prefix=env.get("CREDIT_ENGINE_KEY_PREFIX", cls.key_prefix),
            data_dir=Path(env.get("CREDIT_ENGINE_DATA_DIR", cls.data_dir)),
            redis_appendfsync=appendfsync,
            pg_user=(env.get("CREDIT_ENGINE_PG_USER") or "").strip() or None,
            idempotency_ttl_ms=1000
            * _int(env, "CREDIT_ENGINE_IDEMPOTENCY_TTL_S", cls.idempotency_ttl_ms // 1000, 3600, 10**8),
            hold_report_slack_ms=1000
            * _int(
                env,
                "CREDIT_ENGINE_HOLD_REPORT_SLACK_S",
                cls.hold_report_slack_ms // 1000,
                0,
                limits.hold_report_slack_s_max,
            ),
            outbox_per_org_max=_int(
                env, "CREDIT_ENGINE_OUTBOX_PER_ORG_MAX", cls.outbox_per_org_max, 1, limits.outbox_per_org_max_max
            ),
            pg_pool_size=_int(env, "CREDIT_ENGINE_PG_POOL_SIZE", cls.pg_pool_size, 1, 500),
            redis_pool_size=_int(env, "CREDIT_ENGINE_REDIS_POOL_SIZE", cls.redis_pool_size, 1, 10_000),
            worker_poll_interval_ms=_int(
                env, "CREDIT_ENGINE_WORKER_POLL_INTERVAL_MS", cls.worker_poll_interval_ms, 1, 10_000
            ),
            worker_drain_loops=_int(env, "CREDIT_ENGINE_WORKER_DRAIN_LOOPS", cls.worker_drain_loops, 1, 16),
            worker_sweep_interval_s=_int(
                env, "CREDIT_ENGINE_WORKER_SWEEP_INTERVAL_S", cls.worker_sweep_interval_s, 1, 3600
            ),
            worker_expire_interval_s=_int(
                env, "CREDIT_ENGINE_WORKER_EXPIRE_INTERVAL_S", cls.worker_expire_interval_s, 1, 3600
            ),
            worker_health_check_interval_s=_int(
                env, "CREDIT_ENGINE_WORKER_HEALTH_CHECK_INTERVAL_S", cls.worker_health_check_interval_s, 1, 3600
            ),
            worker_metrics_port=_int(env, "CREDIT_ENGINE_WORKER_METRICS_PORT", cls.worker_metrics_port, 0, 65_535),
            worker_metrics_host=env.get("CREDIT_ENGINE_WORKER_METRICS_HOST", cls.worker_metrics_host),
            log_level=_choice(env, "CREDIT_ENGINE_LOG_LEVEL", cls.log_level.lower(), LOG_LEVELS).upper(),
            log_format=_choice(env, "CREDIT_ENGINE_LOG_FORMAT", cls.log_format, LOG_FORMATS),
            admin_token=env.get("CREDIT_ENGINE_ADMIN_TOKEN") or None,
            vapi_webhook_secret=env.get("VAPI_WEBHOOK_SECRET") or None,
            vapi_hmac_secret=env.get("VAPI_WEBHOOK_HMAC_SECRET") or None,
            vapi_hmac_tolerance_s=_int(env, "VAPI_WEBHOOK_HMAC_TOLERANCE_S", cls.vapi_hmac_tolerance_s, 1, 3600),
            phone_number_pence=_int(
                env, "CREDIT_ENGINE_PHONE_NUMBER_PENCE", cls.phone_number_pence, 1, limits.amount_pence_max
            ),
            phone_number_rent_pence=_int(
                env, "CREDIT_ENGINE_PHONE_NUMBER_RENT_PENCE", cls.phone_number_rent_pence, 1, limits.amount_pence_max
            ),
            rent_grace_days=_int(env, "CREDIT_ENGINE_RENT_GRACE_DAYS", cls.rent_grace_days, 0, 365),
            rent_release_days=_int(env, "CREDIT_ENGINE_RENT_RELEASE_DAYS", cls.rent_release_days, 0, 3650),
            vapi_api_key=env.get("VAPI_API_KEY") or None,
            vapi_base_url=env.get("VAPI_BASE_URL", cls.vapi_base_url).rstrip("/"),
            vapi_api_rps=_int(env, "CREDIT_ENGINE_VAPI_API_RPS", cls.vapi_api_rps, 1, limits.vapi_api_rps_max),
            default_assistant_id=env.get("CREDIT_ENGINE_DEFAULT_ASSISTANT_ID") or None,
            fake_provider_failing_area_codes=_codes(
                env, "CREDIT_ENGINE_FAKE_PROVIDER_FAILING_AREA_CODES", cls.fake_provider_failing_area_codes
            ),
            readiness_outbox_lag_s_max=_int(
                env, "CREDIT_ENGINE_READINESS_OUTBOX_LAG_S_MAX", cls.readiness_outbox_lag_s_max, 1, 86_400
            ),
            idempotent_claim_stale_s=_int(
                env, "CREDIT_ENGINE_IDEMPOTENT_CLAIM_STALE_S", cls.idempotent_claim_stale_s, 1, 86_400
            ),
            kill_warn_lead_ms=1000
            * _int(
                env, "CREDIT_ENGINE_KILL_WARN_LEAD_S", cls.kill_warn_lead_ms // 1000, 0, limits.kill_warn_lead_s_max
            ),
            kill_warning_text=env.get("CREDIT_ENGINE_KILL_WARNING_TEXT") or cls.kill_warning_text,
            kill_attempts_max=_int(
                env, "CREDIT_ENGINE_KILL_ATTEMPTS_MAX", cls.kill_attempts_max, 1, limits.kill_attempts_max_max
            ),
            kill_backoff_base_ms=_int(
                env, "CREDIT_ENGINE_KILL_BACKOFF_BASE_MS", cls.kill_backoff_base_ms, 1, limits.kill_backoff_ms_max
            ),
            kill_backoff_max_ms=_int(
                env, "CREDIT_ENGINE_KILL_BACKOFF_MAX_MS", cls.kill_backoff_max_ms, 1, limits.kill_backoff_ms_max
            ),
            kill_recheck_ms=1000
            * _int(env, "CREDIT_ENGINE_KILL_RECHECK_S", cls.kill_recheck_ms // 1000, 1, limits.kill_recheck_s_max),
            kill_poll_interval_ms=_int(
                env, "CREDIT_ENGINE_KILL_POLL_INTERVAL_MS", cls.kill_poll_interval_ms, 10, 10_000
            ),
            kill_pushes_in_flight_max=_int(
                env, "CREDIT_ENGINE_KILL_PUSHES_IN_FLIGHT_MAX", cls.kill_pushes_in_flight_max, 1, 10_000
            ),
            kill_push_deadline_ms=_int(
                env, "CREDIT_ENGINE_KILL_PUSH_DEADLINE_MS", cls.kill_push_deadline_ms, 50, 600_000
            ),
            kill_end_queue_ttl_ms=1000
            * _int(env, "CREDIT_ENGINE_KILL_END_QUEUE_TTL_S", cls.kill_end_queue_ttl_ms // 1000, 60, 7 * 86_400),
            vapi_control_base_url=(env.get("VAPI_CONTROL_BASE_URL") or "").rstrip("/") or None,
            vapi_control_token=env.get("VAPI_CONTROL_TOKEN") or None,
            public_url=_public_url(env, "CREDIT_ENGINE_PUBLIC_URL"),
            vapi_credential_id=env.get("CREDIT_ENGINE_VAPI_CREDENTIAL_ID") or None,
            unattributed_calls=_choice(
                env, "CREDIT_ENGINE_UNATTRIBUTED_CALLS", cls.unattributed_calls, ("end", "allow")
            ),
            forward_url=_forward_url(env, "CREDIT_ENGINE_FORWARD_URL"),
            forward_secret=_header_secret(env, "CREDIT_ENGINE_FORWARD_SECRET"),
            control_url_hosts=_hosts(env, "CREDIT_ENGINE_CONTROL_URL_HOSTS", cls.control_url_hosts),
            alert_signing_key=env.get("CREDIT_ENGINE_ALERT_SIGNING_KEY") or None,
            alert_attempts_max=_int(env, "CREDIT_ENGINE_ALERT_ATTEMPTS_MAX", cls.alert_attempts_max, 1, 100),
            alert_backoff_base_ms=_int(
                env, "CREDIT_ENGINE_ALERT_BACKOFF_BASE_MS", cls.alert_backoff_base_ms, 1, 3_600_000
            ),
            outbound_allow_private=_bool(env, "CREDIT_ENGINE_OUTBOUND_ALLOW_PRIVATE"),
        )
        engines_own = {settings.vapi_webhook_secret, settings.vapi_hmac_secret} - {None}
        if settings.forward_secret is not None and settings.forward_secret in engines_own:
            # The forward secret goes to platforms' servers: it must not be what Vapi proves itself with.
            message = "CREDIT_ENGINE_FORWARD_SECRET must differ from VAPI_WEBHOOK_SECRET and VAPI_WEBHOOK_HMAC_SECRET"
            raise ConfigError(message + ": platforms' servers receive it")
        return settings

    @property
    def arq_url(self) -> str:
        """Where arq keeps its queue, cron bookkeeping and health check. arq cannot use a Redis
        Cluster (its job keys carry no hash tag and it writes them with MULTI), so a clustered
        deployment gives it a small Redis of its own. It holds no money: losing it costs a few
        cron runs, and every cron is idempotent."""
        if self.arq_redis_url:
            return self.arq_redis_url
        if self.redis_cluster:
            raise ConfigError(
                "CREDIT_ENGINE_REDIS_CLUSTER is set: the worker needs CREDIT_ENGINE_ARQ_REDIS_URL, a plain "
                "(non-cluster) Redis for arq's job bookkeeping"
            )
        if self.redis_url is None:
            raise ConfigError("REDIS_URL is not set")
        return self.redis_url

    @property
    def hmac_secret(self) -> str | None:
        return self.vapi_hmac_secret or self.vapi_webhook_secret

    def __repr__(self) -> str:
        # Secrets never reach a log line through a repr.
        hidden = {
            "admin_token",
            "vapi_webhook_secret",
            "vapi_hmac_secret",
            "vapi_api_key",
            "vapi_control_token",
            "forward_secret",
            "alert_signing_key",
        }
        shown = ", ".join(
            f"{f.name}={'<set>' if f.name in hidden and getattr(self, f.name) else getattr(self, f.name)!r}"
            for f in fields(self)
        )
        return f"Settings({shown})"
