"""Which control URLs the engine may POST to (and send VAPI_CONTROL_TOKEN to): Vapi's hosts over
https only, checked before a base URL replaces the host. Pure functions: no services."""

from dataclasses import replace

import pytest

from credit_engine.engine.config import ConfigError, Settings
from credit_engine.engine.control import control_target, control_url_allowed
from credit_engine.engine.killswitch import check_settings

VAPI = "https://aws-us-west-2-production1-phone-call-websocket.vapi.ai/c0ffee/control"


@pytest.mark.parametrize(
    "url",
    [
        VAPI,
        "https://vapi.ai/c/control",
        "https://api.vapi.ai/c/control?x=1",
        "https://AWS-US-WEST-2.VAPI.AI/c/control",  # host names are case-insensitive
        "https://phone.vapi.ai:443/c/control",
    ],
)
def test_vapis_own_https_urls_are_allowed(url: str) -> None:
    assert control_url_allowed(Settings(), url)


@pytest.mark.parametrize(
    "url",
    [
        None,
        "",
        42,
        "not a url",
        "vapi.ai/c/control",
        "http://aws-us-west-2-production1-phone-call-websocket.vapi.ai/c/control",  # not https
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",  # cloud metadata
        "https://169.254.169.254/c/control",
        "https://127.0.0.1/c/control",
        "https://[::1]/c/control",
        "https://localhost/c/control",
        "https://evil.example/c/control",
        "https://vapi.ai.evil.example/c/control",  # vapi.ai as a prefix, not a suffix
        "https://evilvapi.ai/c/control",  # a suffix without the dot
        "https://vapi.ai@evil.example/c/control",
        "https://evil.example@vapi.ai/c/control",  # userinfo
        "https://user:pw@api.vapi.ai/c/control",
        "https://evil.example\\@vapi.ai/c/control",
        "https://evil.example\\.vapi.ai/c/control",  # backslashes
        "https://api.vapi.ai:8443/c/control",
        "https://api.vapi.ai:0/c/control",
        "https://api.vapi.ai:99999/c/control",
        "https://vapi.ai./c/control",  # a trailing dot is another spelling
        "https://vapi%2eai/c/control",
        "https://xn--vapi-9ua.ai/c/control",
        "https://vаpi.ai/c/control",  # Cyrillic а
        "https://api.vapi.ai/c/control\n",
        "https://api.vapi.ai/c /control",
        "https:///c/control",
        "ftp://api.vapi.ai/c/control",
        "javascript:alert(1)",
        "https://api.vapi.ai/" + "a" * 2100,
    ],
)
def test_anything_else_is_refused(url: object) -> None:
    assert not control_url_allowed(Settings(), url)


def test_the_hosts_and_their_ports_are_configurable() -> None:
    settings = Settings.from_env({"CREDIT_ENGINE_CONTROL_URL_HOSTS": " Vapi.ai , proxy.example.net:8443 "})
    assert settings.control_url_hosts == ("vapi.ai", "proxy.example.net:8443")
    assert control_url_allowed(settings, "https://proxy.example.net:8443/c/control")
    assert control_url_allowed(settings, "https://edge.proxy.example.net:8443/c/control")
    assert not control_url_allowed(settings, "https://proxy.example.net/c/control")  # its port is named: only that one
    assert not control_url_allowed(settings, "https://proxy.example.net:8444/c/control")
    assert Settings.from_env({}).control_url_hosts == ("vapi.ai",)
    for bad in ("vapi.ai/path", "https://vapi.ai", "*.vapi.ai", "vapi.ai:port", "user@vapi.ai"):
        with pytest.raises(ConfigError):
            Settings.from_env({"CREDIT_ENGINE_CONTROL_URL_HOSTS": bad})


def test_a_base_url_replaces_only_the_scheme_and_host_of_an_allowed_url() -> None:
    settings = replace(Settings(), vapi_control_base_url="http://127.0.0.1:9999")
    assert control_target(settings, VAPI + "?a=b") == "http://127.0.0.1:9999/c0ffee/control?a=b"
    assert control_target(Settings(), VAPI) == VAPI
    # The check comes first: a base URL does not launder a URL the webhook should not have named.
    assert not control_url_allowed(settings, "https://evil.example/c0ffee/control")
    with pytest.raises(AssertionError):
        control_target(settings, "https://evil.example/c0ffee/control")


def test_a_push_must_be_over_before_its_action_is_due_again() -> None:
    check_settings(Settings())
    with pytest.raises(ConfigError, match="PUSH_DEADLINE"):
        check_settings(replace(Settings(), kill_push_deadline_ms=1_000, kill_backoff_base_ms=1_000))
    with pytest.raises(ConfigError, match="END_QUEUE_TTL"):
        check_settings(
            replace(Settings(), kill_end_queue_ttl_ms=60_000, kill_attempts_max=5, kill_backoff_max_ms=16_000)
        )
    settings = Settings.from_env(
        {
            "CREDIT_ENGINE_KILL_PUSH_DEADLINE_MS": "400",
            "CREDIT_ENGINE_KILL_PUSHES_IN_FLIGHT_MAX": "8",
            "CREDIT_ENGINE_KILL_END_QUEUE_TTL_S": "600",
        }
    )
    assert (settings.kill_push_deadline_ms, settings.kill_pushes_in_flight_max, settings.kill_end_queue_ttl_ms) == (
        400,
        8,
        600_000,
    )
