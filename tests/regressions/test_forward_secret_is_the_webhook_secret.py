"""Found by an adversarial review (high, configuration): nothing stops CREDIT_ENGINE_FORWARD_SECRET
from being the engine's own VAPI_WEBHOOK_SECRET (the suite itself runs the engine that way:
tests/webapp/test_forwarding.py's loop test, "so the engine accepts what it forwards"), and the
forward secret goes to every org's `forward_url` and to any `server.url` a platform's answer names.
With the two equal, every org's platform holds the engine's Vapi credential: it can post its own
end-of-call-report for its call with a 1 s duration before Vapi's (the first commit stands: the
call is given away), or status-updates/reports for another org's numbers and calls. The settings
should refuse a forward secret equal to the webhook secret (or the HMAC secret). Fixed: they do."""

import pytest

from credit_engine.engine.config import ConfigError, Settings

SECRET = "the-engines-own-vapi-webhook-secret-0123456789"


@pytest.mark.parametrize("webhook_setting", ["VAPI_WEBHOOK_SECRET", "VAPI_WEBHOOK_HMAC_SECRET"])
def test_the_forward_secret_may_not_be_the_engines_own_webhook_credential(webhook_setting: str) -> None:
    env = {
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        webhook_setting: SECRET,
        "CREDIT_ENGINE_FORWARD_URL": "https://platform.example.com/vapi",
        "CREDIT_ENGINE_FORWARD_SECRET": SECRET,
    }
    with pytest.raises(ConfigError, match="CREDIT_ENGINE_FORWARD_SECRET"):
        Settings.from_env(env)
