"""engine/config.py: the platform's server and its secret, checked when read; the secret never shown."""

import re
from pathlib import Path

import pytest

from credit_engine.engine.config import ConfigError, Settings


def test_the_forward_url_is_checked_when_read() -> None:
    read = Settings.from_env({"CREDIT_ENGINE_FORWARD_URL": " https://platform.example.com/vapi?env=prod "})
    assert read.forward_url == "https://platform.example.com/vapi?env=prod"
    assert Settings.from_env({}).forward_url is None
    for bad in (
        "platform.example.com",
        "ftp://platform.example.com/",
        "https://",
        "https://p.test/#frag",
        "https://p.test:99999/",
        "https://p.test/a b",
        "https://p.test/\x00",
        "https://p.test/" + "p" * 2000,
    ):
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


def test_every_setting_the_engine_reads_is_a_row_of_the_readmes_configuration_table() -> None:
    """A setting added to engine/config.py and forgotten in the README fails here: each name the
    reader looks up has a table row of its own, written out in full (no `…_MAX_MS`)."""
    root = Path(__file__).resolve().parents[2]
    read = set(
        re.findall(
            r'"((?:CREDIT_ENGINE|VAPI)_[A-Z_]+|REDIS_URL|DATABASE_URL)"', (root / "engine/config.py").read_text()
        )
    )
    rows = [line.split("|")[1] for line in (root / "README.md").read_text().splitlines() if line.startswith("| `")]
    documented = {name for row in rows for name in re.findall(r"`([A-Z][A-Z_]+)`", row)}
    assert len(read) > 50
    assert read - documented == set()


def test_the_log_format_is_text_or_json() -> None:
    assert Settings.from_env({}).log_format == "text"
    assert Settings.from_env({"CREDIT_ENGINE_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ConfigError, match="CREDIT_ENGINE_LOG_FORMAT"):
        Settings.from_env({"CREDIT_ENGINE_LOG_FORMAT": "xml"})


def test_every_default_is_the_dataclasss_own() -> None:
    """Each default is written once, on the dataclass; the environment reader asks it (cls.<field>)
    rather than repeating it, so an empty environment gives exactly Settings()."""
    assert Settings.from_env({}) == Settings()
    source = (Path(__file__).resolve().parents[2] / "engine/config.py").read_text()
    reader = source.split("def from_env", 1)[1].split("engines_own", 1)[0]
    repeated = re.findall(r'env\.get\("[A-Z_]+", "[^"]*"\)|_int\(env, "[A-Z_]+", [0-9]', reader)
    assert repeated == []


def test_a_log_level_logging_does_not_know_is_refused_when_read() -> None:
    assert Settings.from_env({"CREDIT_ENGINE_LOG_LEVEL": "debug"}).log_level == "DEBUG"
    with pytest.raises(ConfigError, match="CREDIT_ENGINE_LOG_LEVEL"):
        Settings.from_env({"CREDIT_ENGINE_LOG_LEVEL": "verbose"})
