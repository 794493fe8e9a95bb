"""Parsing and showing the values of settings: durations, comma lists, loopback
hosts, JWKS URL lists, URLs with their password masked. No `Settings` here."""

from __future__ import annotations

import ipaddress
import math
import re

__all__ = [
    "ENV_PREFIX",
    "is_loopback",
    "mask_url",
    "parse_duration",
    "parse_jwks_urls",
    "split_list",
]

ENV_PREFIX = "TIDINGS_"  # of every setting's environment variable, and its name in messages
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*(ms|s|m|h|d)?\s*", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(://[^:/@]*):[^@/]*@")
_JWKS_PAIR = re.compile(r"(.+?)=(https?://\S+)")


def parse_duration(value: object) -> float:
    """Seconds from a number or a string: ``30``, ``30s``, ``250ms``, ``5m``, ``24h``, ``90d``."""
    if isinstance(value, bool):
        raise ValueError(f"must be a duration such as 30s, 5m or 24h (got {value!r})")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value)):
        seconds = float(m[1]) * _UNITS[(m[2] or "s").lower()]
    else:
        raise ValueError(f"must be a duration such as 30s, 5m or 24h (got {value!r})")
    if not math.isfinite(seconds):
        raise ValueError(f"must be a finite duration (got {value!r})")
    return seconds


def split_list(value: object) -> object:
    """Comma-separated string (env, TOML) or a real list; blanks stripped and dropped."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list | tuple):
        return value
    items = [v.strip() if isinstance(v, str) else v for v in value]
    return [v for v in items if v != ""]  # non-strings stay, for the type check to name


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also IPv4-mapped) and ``localhost``."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def parse_jwks_urls(value: str) -> tuple[tuple[str | None, str], ...]:
    """``https://idp/jwks`` → ((None, url),); ``iss1=url1,iss2=url2`` → ((iss1, url1), ...)."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    pairs = [_JWKS_PAIR.fullmatch(p) for p in parts]
    if len(parts) == 1 and pairs[0] is None and parts[0].startswith(("http://", "https://")):
        return ((None, parts[0]),)
    if not parts or any(m is None for m in pairs):
        raise ValueError("must be one http(s) URL or a comma list of issuer=url pairs")
    return tuple((m[1].strip(), m[2]) for m in pairs if m is not None)


def mask_url(url: str) -> str:
    return _URL_PASSWORD.sub(r"\1:***@", url)
