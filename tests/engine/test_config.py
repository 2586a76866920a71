"""engine/config.py: the platform's server and its secret, checked when read; the secret never shown."""

import pytest

from engine.config import ConfigError, Settings


def test_the_forward_url_is_checked_when_read() -> None:
    read = Settings.from_env({"CREDIT_ENGINE_FORWARD_URL": " https://platform.example.com/vapi?env=prod "})
    assert read.forward_url == "https://platform.example.com/vapi?env=prod"
    assert Settings.from_env({}).forward_url is None
    for bad in ("platform.example.com", "ftp://platform.example.com/", "https://", "https://p.test/#frag",
                "https://p.test:99999/", "https://p.test/a b", "https://p.test/\x00", "https://p.test/" + "p" * 2000):  # fmt: skip
        with pytest.raises(ConfigError, match="CREDIT_ENGINE_FORWARD_URL"):
            Settings.from_env({"CREDIT_ENGINE_FORWARD_URL": bad})


def test_the_forward_secret_is_checked_when_read_and_never_shown() -> None:
    secret = "fwd-" + "s" * 40
    read = Settings.from_env({"CREDIT_ENGINE_FORWARD_SECRET": secret})
    assert read.forward_secret == secret
    assert secret not in repr(read) and "forward_secret='<set>'" in repr(read)
    assert "forward_secret=None" in repr(Settings.from_env({}))
    for bad in ("with space", "new\nline", "caf\u00e9", "x" * 1001):
        with pytest.raises(ConfigError, match="CREDIT_ENGINE_FORWARD_SECRET") as refused:
            Settings.from_env({"CREDIT_ENGINE_FORWARD_SECRET": bad})
        assert bad not in str(refused.value)  # the secret itself is never echoed
