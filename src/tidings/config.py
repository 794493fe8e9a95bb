"""`Settings`: one frozen, validated value object read from flags, `TIDINGS_*` env and TOML.

Every setting, its default and its rule are listed in docs/configuration.md. Parsing
single values is config_values.py's; error messages, config_errors.py's.
"""

from __future__ import annotations

import contextvars
import logging
import os
import secrets
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from .config_errors import explain, num
from .config_values import (
    ENV_PREFIX,
    is_loopback,
    mask_url,
    parse_duration,
    parse_jwks_urls,
    split_list,
)
from .errors import ConfigError
from .topics import TopicPatterns

__all__ = ["Settings", "is_loopback", "parse_duration", "parse_jwks_urls"]

log = logging.getLogger("tidings.config")

_MIN_SECRET_BYTES = 32
_DERIVED = frozenset({"dev_mode"})  # computed by with_dev_secret(), never read from env/TOML


Duration = Annotated[float, BeforeValidator(parse_duration)]
StrList = Annotated[list[str], BeforeValidator(split_list)]
_LogLevel = Literal["debug", "info", "warning", "error"]
_LogFormat = Literal["text", "json"]
_toml_values: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("tidings_toml")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="forbid",
        env_ignore_empty=True,  # TIDINGS_JWT_SECRET= means "not set", not "empty secret"
        enable_decoding=False,  # lists are comma-separated, not JSON
    )

    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=0, le=65535)
    database_url: str = "sqlite+aiosqlite:///./tidings.db"
    broker_url: str = "memory://"
    jwt_secret: SecretStr | None = None
    jwt_public_key: str | None = None
    jwt_jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway: Duration = Field(30.0, ge=0)
    api_keys: StrList = Field(default_factory=list)
    client_buffer_size: int = Field(256, ge=1)
    heartbeat_interval: Duration = Field(30.0, ge=5)
    client_timeout: Duration = 300.0
    max_connections: int = Field(0, ge=0)
    max_connections_per_user: int = Field(0, ge=0)
    history_size: int = Field(1000, ge=0)
    history_ttl: Duration = Field(86400.0, ge=0)
    enable_topics: bool = True
    public_topics: StrList = Field(default_factory=list)
    max_payload: int = Field(65536, ge=1)
    log_level: _LogLevel = "info"
    log_format: _LogFormat = "text"
    insecure_query_auth: bool = False
    retry_ms: int = Field(3000, ge=0)
    idempotency_ttl: Duration = Field(86400.0, ge=0)
    max_topics_per_connection: int = Field(64, ge=1)
    cors_origins: StrList = Field(default_factory=list)
    allowed_origins: StrList = Field(default_factory=list)
    metrics_port: int | None = Field(None, ge=0, le=65535)
    shutdown_timeout: Duration = Field(10.0, ge=0)
    inbox_retention: Duration = Field(90 * 86400.0, ge=0)
    ingest_url: str | None = None
    ingest_group: str = Field("tidings", min_length=1, max_length=64)
    ingest_tenant: str | None = Field(None, max_length=128)
    demo: bool | None = None
    ws_ping_interval: Duration = Field(54.0, gt=0)
    ws_pong_timeout: Duration = Field(60.0, gt=0)
    ws_auth_timeout: Duration = Field(10.0, gt=0)
    ws_per_message_deflate: bool = False
    workers: int = Field(1, ge=1)
    presence_interval: Duration = Field(1.0, gt=0)
    presence_ttl: Duration = Field(10.0, gt=0)
    connect_rate: float = Field(0.0, ge=0)
    publish_rate: float = Field(0.0, ge=0)
    dev_mode: bool = False

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(explain(exc, _DURATION_FIELDS)) from None

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> Settings:
        """overrides (None ignored) > ``TIDINGS_*`` env > TOML file > defaults."""
        toml = _read_toml(Path(config_file)) if config_file is not None else {}
        token = _toml_values.set(toml)
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        finally:
            _toml_values.reset(token)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _EnvSource(settings_cls), _TomlSource(settings_cls)

    # -- field rules -----------------------------------------------------------------------

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("jwt_secret")
    @classmethod
    def _secret_length(cls, value: SecretStr | None) -> SecretStr | None:
        got = len(value.get_secret_value().encode()) if value is not None else _MIN_SECRET_BYTES
        if got < _MIN_SECRET_BYTES:
            raise ValueError(f"must be at least {_MIN_SECRET_BYTES} bytes (got {got})")
        return value

    @field_validator("jwt_public_key")
    @classmethod
    def _read_pem(cls, value: str | None) -> str | None:
        # PEM text is used as is; anything else names a file holding it.
        if value is None or value.lstrip().startswith("-----"):
            return value
        try:
            return Path(value).expanduser().read_text()
        except OSError as exc:
            raise ValueError(f"must be PEM text or a readable PEM file ({exc})") from None

    @field_validator("jwt_jwks_url")
    @classmethod
    def _check_jwks(cls, value: str | None) -> str | None:
        if value is not None:
            parse_jwks_urls(value)
        return value

    @field_validator("public_topics")
    @classmethod
    def _check_patterns(cls, value: list[str]) -> list[str]:
        try:
            TopicPatterns(value)
        except ValueError as exc:
            raise ValueError(f"has an {exc}") from None
        return value

    @field_validator("database_url", "broker_url", "ingest_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError(f"must be a URL such as scheme://... (got {mask_url(value)!r})")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> Settings:
        if self.client_timeout < 2 * self.heartbeat_interval:
            raise ValueError(
                f"TIDINGS_CLIENT_TIMEOUT must be at least 2 × TIDINGS_HEARTBEAT_INTERVAL "
                f"({num(2 * self.heartbeat_interval)} s), got {num(self.client_timeout)} s"
            )
        if self.presence_ttl < 2 * self.presence_interval:
            raise ValueError(
                f"TIDINGS_PRESENCE_TTL must be at least 2 × TIDINGS_PRESENCE_INTERVAL "
                f"({num(2 * self.presence_interval)} s), got {num(self.presence_ttl)} s"
            )
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError("TIDINGS_METRICS_PORT must differ from TIDINGS_PORT")
        jwks = parse_jwks_urls(self.jwt_jwks_url) if self.jwt_jwks_url else ()
        if self.jwt_issuer and any(iss is not None for iss, _ in jwks):
            raise ValueError(
                "TIDINGS_JWT_ISSUER cannot be combined with issuer=url pairs in "
                "TIDINGS_JWT_JWKS_URL (each pair already names its issuer)"
            )
        return self

    # -- start-up and dev mode ------------------------------------------------------------

    @property
    def has_jwt_key(self) -> bool:
        return self.jwt_secret is not None or bool(self.jwt_public_key or self.jwt_jwks_url)

    def check_startup(self) -> None:
        """Rules that only bind a server about to listen (``tidings token`` need not pass them)."""
        if not is_loopback(self.host):
            if self.insecure_query_auth:
                raise ConfigError(
                    f"TIDINGS_INSECURE_QUERY_AUTH is allowed only on a loopback host "
                    f"(TIDINGS_HOST is {self.host!r})"
                )
            if not self.has_jwt_key:
                raise ConfigError(
                    f"TIDINGS_HOST {self.host!r} is not loopback: set TIDINGS_JWT_SECRET "
                    f"(at least {_MIN_SECRET_BYTES} bytes), or TIDINGS_JWT_PUBLIC_KEY or "
                    f"TIDINGS_JWT_JWKS_URL"
                )
        if self.insecure_query_auth:
            log.warning(
                "TIDINGS_INSECURE_QUERY_AUTH is on: ?user_id= is trusted as identity. "
                "Use it for local development only."
            )

    def dev_secret_path(self) -> Path:
        """``.tidings_secret`` beside the SQLite database file, else in the working directory."""
        url = self.database_url
        if url.lower().startswith("sqlite"):
            # sqlite:///rel.db and sqlite:////abs.db: the path follows the third slash.
            db = url.split("://", 1)[1].split("?", 1)[0].removeprefix("/")
            if db and db != ":memory:":
                return Path(db).parent / ".tidings_secret"
        return Path(".tidings_secret")

    def with_dev_secret(self) -> Settings:
        """A copy with the local dev secret (created once, 0600) when no JWT key is configured.

        Off loopback this returns self unchanged: check_startup() then refuses to start.
        """
        if self.has_jwt_key or not is_loopback(self.host):
            return self
        secret = _read_or_create_secret(self.dev_secret_path())
        return self.model_copy(update={"jwt_secret": SecretStr(secret), "dev_mode": True})

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            if name == "api_keys":
                yield name, ["***"] * len(self.api_keys)
            elif name in ("database_url", "broker_url", "ingest_url") and value:
                yield name, mask_url(value)
            else:
                yield name, value


class _EnvSource(EnvSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if field_name in _DERIVED:
            return None, field_name, False
        return super().get_field_value(field, field_name)


class _TomlSource(PydanticBaseSettingsSource):
    """The TOML file's values, already read by Settings.load() for this construction."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return _toml_values.get({}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_toml_values.get({}))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    table = data.pop("tidings", {})
    if not isinstance(table, dict):
        raise ConfigError(f"config file {str(path)!r}: [tidings] must be a table")
    known = set(Settings.model_fields) - _DERIVED
    values: dict[str, Any] = {}
    for raw_key, value in [*data.items(), *table.items()]:
        key = raw_key.lower().removeprefix(ENV_PREFIX.lower())
        if key not in known:
            raise ConfigError(
                f"config file {str(path)!r}: unknown key {raw_key!r} "
                f"({ENV_PREFIX}{key.upper()} is not a setting)"
            )
        if key in values:
            raise ConfigError(f"config file {str(path)!r}: {ENV_PREFIX}{key.upper()} is set twice")
        values[key] = value
    return values


def _read_or_create_secret(path: Path) -> str:
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(48) + "\n")
    try:
        # link() never replaces: when two processes race, both end up reading the winner's.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return _read_secret(path)


def _read_secret(path: Path) -> str:
    secret = path.read_text().strip()
    if len(secret.encode()) < _MIN_SECRET_BYTES:
        raise ConfigError(
            f"dev secret file {str(path)!r} holds fewer than {_MIN_SECRET_BYTES} bytes; "
            "delete it to have a new one generated, or set TIDINGS_JWT_SECRET"
        )
    return secret


# Fields in seconds, for error messages (config_errors.py).
_DURATION_FIELDS = frozenset(
    name
    for name, f in Settings.model_fields.items()
    if BeforeValidator(parse_duration) in f.metadata
)
