"""`TIDINGS_INGEST_URL` → the `Source` that reads it."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from ..config import parse_duration
from ..errors import ConfigError

if TYPE_CHECKING:
    from . import Source


def create_source(url: str, *, group: str = "tidings") -> Source:
    """The source for a TIDINGS_INGEST_URL; raises ConfigError naming what is wrong."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    if scheme == "nats":
        from .nats import NatsSource

        subject = unquote(parts.path.lstrip("/"))
        mode = query.pop("mode", "jetstream")
        stream = query.pop("stream", None)
        _no_more(query)
        if not subject or any(c in subject for c in " \t\r\n"):
            raise ConfigError(
                "TIDINGS_INGEST_URL must name a NATS subject: nats://host:4222/<subject>"
            )
        if mode not in ("jetstream", "core"):
            raise ConfigError("TIDINGS_INGEST_URL: ?mode= must be jetstream or core")
        server = urlunsplit((scheme, parts.netloc, "", "", ""))
        return NatsSource(server, subject, group=group, stream=stream, core=mode == "core")
    if scheme in ("redis", "rediss"):
        from .redis import RedisSource

        stream = query.pop("stream", "")
        claim_idle = query.pop("claim_idle", "60s")
        if not stream:
            raise ConfigError(
                "TIDINGS_INGEST_URL must name a Redis stream: redis://host:6379/0?stream=<name>"
            )
        try:
            idle = parse_duration(claim_idle)
        except ValueError as exc:
            raise ConfigError(f"TIDINGS_INGEST_URL: ?claim_idle= {exc}") from None
        rest = "&".join(f"{k}={v}" for k, v in query.items())  # redis-py's own options
        server = urlunsplit((scheme, parts.netloc, parts.path, rest, ""))
        return RedisSource(server, stream, group=group, claim_idle=idle)
    raise ConfigError(
        "TIDINGS_INGEST_URL must be nats://host:4222/<subject> or redis://host:6379/0?stream=<name>"
    )


def _no_more(query: dict[str, str]) -> None:
    if query:
        raise ConfigError(f"TIDINGS_INGEST_URL: unknown option ?{next(iter(query))}=")
