"""A settings `ValidationError` as the operator reads it: one line per problem, naming
the environment variable, the rule and the value (never a secret's)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from .config_values import ENV_PREFIX

__all__ = ["explain", "num"]

SECRET_FIELDS = frozenset({"jwt_secret", "api_keys"})  # their values are never shown


def num(value: object) -> str:
    """2.0 → "2", "abc" → "'abc'": numbers as an operator would write them."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, str) else str(value)


def explain(exc: ValidationError, durations: frozenset[str]) -> str:
    """`durations`: the fields in seconds (their rules name the unit)."""
    return "\n".join(_explain_one(err, durations) for err in exc.errors())


_RULES = {
    "greater_than_equal": "must be at least {ge}{unit}",
    "greater_than": "must be greater than {gt}{unit}",
    "less_than_equal": "must be at most {le}{unit}",
    "literal_error": "must be one of {expected}",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
    "bool_parsing": "must be true or false",
}


def _explain_one(err: Mapping[str, Any], durations: frozenset[str]) -> str:
    loc, ctx = err["loc"], err.get("ctx", {})
    if not loc:  # a model-level rule: its message already names the keys
        return str(ctx.get("error", err["msg"]))
    field = str(loc[0])
    key = ENV_PREFIX + field.upper()
    if err["type"] == "extra_forbidden":
        return f"{key} is not a setting"
    if err["type"] == "value_error":
        return f"{key} {ctx['error']}"
    unit = " s" if field in durations else ""
    rule = _RULES.get(err["type"], "is invalid ({msg})")
    rule = rule.format(
        unit=unit,
        msg=err["msg"],
        **{k: num(v) if not isinstance(v, str) else v for k, v in ctx.items()},
    )
    got = "" if field in SECRET_FIELDS else f" (got {num(err['input'])})"
    return f"{key} {rule}{got}"
