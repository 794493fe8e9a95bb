from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tidings.config import Settings, is_loopback, parse_duration, parse_jwks_urls
from tidings.errors import ConfigError

SECRET = "s" * 32


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("TIDINGS_"):
            monkeypatch.delenv(name)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tidings.toml"
    path.write_text(text, encoding="utf-8")
    return path


# -- durations and lists -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (2.5, 2.5),
        ("30", 30.0),
        ("30s", 30.0),
        ("250ms", 0.25),
        ("5m", 300.0),
        ("24h", 86400.0),
        ("90d", 90 * 86400.0),
        (" 1.5h ", 5400.0),
        ("10 S", 10.0),
        ("-1", -1.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "abc", "5x", "1h30m", "s", True, None, [], float("inf")])
def test_parse_duration_refuses(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


def test_durations_and_lists_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_HEARTBEAT_INTERVAL", "1m")
    monkeypatch.setenv("TIDINGS_CLIENT_TIMEOUT", "2h")
    monkeypatch.setenv("TIDINGS_API_KEYS", " k1, k2,, ")
    monkeypatch.setenv("TIDINGS_PUBLIC_TOPICS", "news:*,alerts:**")
    monkeypatch.setenv("TIDINGS_CORS_ORIGINS", "")
    s = Settings.load()
    assert s.heartbeat_interval == 60.0
    assert s.client_timeout == 7200.0
    assert s.api_keys == ["k1", "k2"]
    assert s.public_topics == ["news:*", "alerts:**"]
    assert s.cors_origins == []


def test_defaults() -> None:
    s = Settings.load()
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.database_url == "sqlite+aiosqlite:///./tidings.db"
    assert s.broker_url == "memory://"
    assert s.jwt_secret is None and s.api_keys == []
    assert s.heartbeat_interval == 30.0 and s.client_timeout == 300.0
    assert s.history_ttl == 86400.0 and s.inbox_retention == 90 * 86400.0
    assert s.jwt_leeway == 30.0 and s.retry_ms == 3000
    assert s.log_level == "info" and s.log_format == "text"
    assert s.demo is None and s.metrics_port is None and s.dev_mode is False


# -- sources and their priority ------------------------------------------------------------


def test_priority_overrides_env_toml_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_toml(tmp_path, "port = 1001\nhistory_size = 5\nlog_level = 'debug'\n")
    assert Settings.load(config).port == 1001
    monkeypatch.setenv("TIDINGS_PORT", "1002")
    s = Settings.load(config)
    assert (s.port, s.history_size, s.log_level) == (1002, 5, "debug")
    assert Settings.load(config, port=1003).port == 1003
    assert Settings.load(config, port=None).port == 1002  # unset CLI flags do not win


def test_toml_key_spellings_and_table(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path,
        'TIDINGS_HEARTBEAT_INTERVAL = "10s"\n'
        "api_keys = ['a', 'b']\n"
        "[tidings]\n"
        'client_timeout = "1m"\n'
        'public_topics = "x:*, y"\n',
    )
    s = Settings.load(config)
    assert s.heartbeat_interval == 10.0 and s.client_timeout == 60.0
    assert s.api_keys == ["a", "b"] and s.public_topics == ["x:*", "y"]


def test_toml_values_do_not_leak_into_later_loads(tmp_path: Path) -> None:
    Settings.load(write_toml(tmp_path, "port = 1001\n"))
    assert Settings.load().port == 8000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 'blue'\n", "TIDINGS_COLOUR is not a setting"),
        ("dev_mode = true\n", "TIDINGS_DEV_MODE is not a setting"),
        ("port = 1\n[tidings]\nTIDINGS_PORT = 2\n", "TIDINGS_PORT is set twice"),
        ("port = \n", "not valid TOML"),
        ("tidings = 3\n", "must be a table"),
        ("api_keys = ['ok', 7]\n", "TIDINGS_API_KEYS is invalid"),
        ("host = 5\n", "TIDINGS_HOST is invalid"),
        ("heartbeat_interval = 1\n", "TIDINGS_HEARTBEAT_INTERVAL must be at least 5 s"),
    ],
)
def test_toml_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.load(write_toml(tmp_path, text))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        Settings.load(tmp_path / "nope.toml")


def test_dev_mode_is_not_read_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_DEV_MODE", "true")
    assert Settings.load().dev_mode is False


def test_empty_env_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_JWT_SECRET", "")
    monkeypatch.setenv("TIDINGS_METRICS_PORT", "")
    s = Settings.load()
    assert s.jwt_secret is None and s.metrics_port is None


def test_settings_are_frozen() -> None:
    s = Settings.load()
    with pytest.raises(ValidationError):
        s.port = 1


# -- rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"heartbeat_interval": "2"}, "TIDINGS_HEARTBEAT_INTERVAL must be at least 5 s (got 2)"),
        (
            {"client_timeout": "30s"},
            "TIDINGS_CLIENT_TIMEOUT must be at least 2 × TIDINGS_HEARTBEAT_INTERVAL (60 s), "
            "got 30 s",
        ),
        ({"port": "abc"}, "TIDINGS_PORT must be an integer (got 'abc')"),
        ({"port": 70000}, "TIDINGS_PORT must be at most 65535"),
        ({"client_buffer_size": 0}, "TIDINGS_CLIENT_BUFFER_SIZE must be at least 1 (got 0)"),
        ({"max_connections": -1}, "TIDINGS_MAX_CONNECTIONS must be at least 0"),
        ({"max_connections_per_user": -1}, "TIDINGS_MAX_CONNECTIONS_PER_USER must be at least 0"),
        ({"history_size": -1}, "TIDINGS_HISTORY_SIZE must be at least 0"),
        ({"history_ttl": "-1s"}, "TIDINGS_HISTORY_TTL must be at least 0 s"),
        ({"max_payload": 0}, "TIDINGS_MAX_PAYLOAD must be at least 1"),
        ({"retry_ms": -5}, "TIDINGS_RETRY_MS must be at least 0"),
        ({"max_topics_per_connection": 0}, "TIDINGS_MAX_TOPICS_PER_CONNECTION must be at least 1"),
        ({"workers": 0}, "TIDINGS_WORKERS must be at least 1"),
        ({"connect_rate": -1}, "TIDINGS_CONNECT_RATE must be at least 0"),
        ({"publish_rate": "x"}, "TIDINGS_PUBLISH_RATE must be a number"),
        ({"ws_ping_interval": 0}, "TIDINGS_WS_PING_INTERVAL must be greater than 0 s"),
        ({"jwt_leeway": "soon"}, "TIDINGS_JWT_LEEWAY must be a duration"),
        ({"log_level": "verbose"}, "TIDINGS_LOG_LEVEL must be one of 'debug', 'info'"),
        ({"log_format": "xml"}, "TIDINGS_LOG_FORMAT must be one of 'text' or 'json'"),
        ({"enable_topics": "maybe"}, "TIDINGS_ENABLE_TOPICS must be true or false"),
        ({"public_topics": "a:**:b"}, "TIDINGS_PUBLIC_TOPICS has an invalid topic pattern"),
        ({"public_topics": "caf\u00e9"}, "TIDINGS_PUBLIC_TOPICS has an invalid topic pattern"),
        ({"database_url": "tidings.db"}, "TIDINGS_DATABASE_URL must be a URL"),
        ({"broker_url": "redis"}, "TIDINGS_BROKER_URL must be a URL"),
        ({"jwt_secret": "short"}, "TIDINGS_JWT_SECRET must be at least 32 bytes (got 5)"),
        ({"jwt_public_key": "/no/such.pem"}, "TIDINGS_JWT_PUBLIC_KEY must be PEM text"),
        ({"jwt_jwks_url": "ftp://idp"}, "TIDINGS_JWT_JWKS_URL must be one http(s) URL"),
        (
            {"jwt_jwks_url": "https://a=https://a/jwks", "jwt_issuer": "https://a"},
            "TIDINGS_JWT_ISSUER cannot be combined",
        ),
        ({"metrics_port": 8000}, "TIDINGS_METRICS_PORT must differ from TIDINGS_PORT"),
        ({"colour": "blue"}, "TIDINGS_COLOUR is not a setting"),
    ],
)
def test_rules_name_the_key(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.load(**overrides)
    assert message in str(caught.value)


def test_env_errors_name_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDINGS_HEARTBEAT_INTERVAL", "2s")
    with pytest.raises(ConfigError, match=r"TIDINGS_HEARTBEAT_INTERVAL must be at least 5 s"):
        Settings.load()


def test_every_error_is_reported() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.load(port=-1, workers=0)
    assert "TIDINGS_PORT" in str(caught.value) and "TIDINGS_WORKERS" in str(caught.value)


def test_direct_construction_raises_config_error_too() -> None:
    with pytest.raises(ConfigError, match="TIDINGS_PORT"):
        Settings(port=-1)


def test_secret_length_counts_bytes_and_is_never_echoed() -> None:
    assert Settings.load(jwt_secret="é" * 16).jwt_secret is not None  # 32 bytes
    with pytest.raises(ConfigError) as caught:
        Settings.load(jwt_secret="hunter2-is-not-long-enough")
    assert "hunter2" not in str(caught.value)


def test_client_timeout_boundary() -> None:
    s = Settings.load(heartbeat_interval="5s", client_timeout="10s")
    assert s.client_timeout == 10.0


def test_public_key_from_file(tmp_path: Path) -> None:
    pem = "-----BEGIN PUBLIC KEY-----\nabc\n-----END PUBLIC KEY-----\n"
    path = tmp_path / "key.pem"
    path.write_text(pem)
    assert Settings.load(jwt_public_key=str(path)).jwt_public_key == pem
    assert Settings.load(jwt_public_key=pem).jwt_public_key == pem


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("https://idp/jwks", ((None, "https://idp/jwks"),)),
        ("https://idp/jwks?tenant=a", ((None, "https://idp/jwks?tenant=a"),)),
        (
            "https://a=https://a/jwks, b=http://b/keys",
            (("https://a", "https://a/jwks"), ("b", "http://b/keys")),
        ),
    ],
)
def test_parse_jwks_urls(value: str, parsed: tuple[tuple[str | None, str], ...]) -> None:
    assert parse_jwks_urls(value) == parsed


@pytest.mark.parametrize("value", ["", "idp/jwks", "https://a/jwks,https://b/jwks", "a=ftp://x"])
def test_parse_jwks_urls_refuses(value: str) -> None:
    with pytest.raises(ValueError):
        parse_jwks_urls(value)


# -- start-up rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LocalHost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_check_startup_off_loopback_needs_a_key() -> None:
    s = Settings.load(host="0.0.0.0")  # loading alone is fine: `tidings token` must work
    with pytest.raises(ConfigError, match="set TIDINGS_JWT_SECRET"):
        s.check_startup()
    Settings.load(host="0.0.0.0", jwt_secret=SECRET).check_startup()
    Settings.load(host="0.0.0.0", jwt_jwks_url="https://idp/jwks").check_startup()
    Settings.load().check_startup()


def test_insecure_query_auth_only_on_loopback(caplog: pytest.LogCaptureFixture) -> None:
    s = Settings.load(host="0.0.0.0", jwt_secret=SECRET, insecure_query_auth=True)
    with pytest.raises(ConfigError, match="TIDINGS_INSECURE_QUERY_AUTH"):
        s.check_startup()
    with caplog.at_level(logging.WARNING, logger="tidings.config"):
        Settings.load(insecure_query_auth=True).check_startup()
    assert "TIDINGS_INSECURE_QUERY_AUTH" in caplog.text


# -- dev secret ----------------------------------------------------------------------------


def test_dev_secret_created_once_and_reused(tmp_path: Path) -> None:
    s = Settings.load(database_url=f"sqlite+aiosqlite:///{tmp_path}/data/t.db")
    path = s.dev_secret_path()
    assert path == tmp_path / "data" / ".tidings_secret"
    first = s.with_dev_secret()
    assert first.dev_mode is True and first.jwt_secret is not None
    assert len(first.jwt_secret.get_secret_value()) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = Settings.load(database_url=s.database_url).with_dev_secret()
    assert second.jwt_secret == first.jwt_secret
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    assert s.dev_mode is False  # the original is untouched


def test_dev_secret_not_used_when_a_key_is_configured_or_off_loopback(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/t.db"
    configured = Settings.load(database_url=url, jwt_secret=SECRET)
    assert configured.with_dev_secret() is configured
    public = Settings.load(database_url=url, host="0.0.0.0")
    assert public.with_dev_secret() is public
    assert not (tmp_path / ".tidings_secret").exists()


def test_dev_secret_refuses_a_truncated_file(tmp_path: Path) -> None:
    (tmp_path / ".tidings_secret").write_text("short\n")
    s = Settings.load(database_url=f"sqlite:///{tmp_path}/t.db")
    with pytest.raises(ConfigError, match="delete it"):
        s.with_dev_secret()


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite+aiosqlite:///./tidings.db", Path(".tidings_secret")),
        ("sqlite+aiosqlite:///data/x.db", Path("data/.tidings_secret")),
        ("sqlite:////var/lib/tidings/x.db?mode=rwc", Path("/var/lib/tidings/.tidings_secret")),
        ("sqlite+aiosqlite:///:memory:", Path(".tidings_secret")),
        ("postgresql+asyncpg://u:p@db/tidings", Path(".tidings_secret")),
    ],
)
def test_dev_secret_path(url: str, path: Path) -> None:
    assert Settings.load(database_url=url).dev_secret_path() == path


# -- repr ----------------------------------------------------------------------------------


def test_repr_hides_secrets() -> None:
    s = Settings.load(
        jwt_secret="x" * 40,
        api_keys="live-key-123,other-key-456",
        database_url="postgresql+asyncpg://app:db-pass-789@db/tidings",
        broker_url="redis://:redis-pass-000@cache:6379/0",
    )
    text = repr(s)
    for secret in ("x" * 40, "live-key-123", "other-key-456", "db-pass-789", "redis-pass-000"):
        assert secret not in text
    assert "api_keys=['***', '***']" in text
    assert "heartbeat_interval=30.0" in text
    assert "postgresql+asyncpg://app:***@db/tidings" in text
