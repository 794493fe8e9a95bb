"""Logging set-up: text or JSON lines, with credentials redacted everywhere."""

from __future__ import annotations

import logging
import re
import sys
import time

import orjson

_TOKEN_PARAM = re.compile(r"(\b[\w-]*token=)[^&\s\"';,]+", re.IGNORECASE)
_BEARER = re.compile(r"(\bbearer\s+)[^\s\"',;]+", re.IGNORECASE)


def redact(text: str) -> str:
    """Masks ``…token=`` parameter values (token, access_token, tidings_token) and Bearer values."""
    return _BEARER.sub(r"\1***", _TOKEN_PARAM.sub(r"\1***", text))


class RedactingFilter(logging.Filter):
    """Applies `redact` to a record's final message (e.g. uvicorn's access log).

    The message is formatted first and the redacted text kept with no
    arguments left: redacting the template alone could remove a `%s` after
    `token=` and leave an argument (the token itself) with no place to go.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True  # a broken record: let logging report it as usual
        redacted = redact(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        return True


class ClientFaultFilter(logging.Filter):
    """uvicorn logs a WebSocket text frame that is not UTF-8 as an error with its
    traceback, though the fault is the client's (it then closes the socket with 1007):
    one warning line instead, so a client cannot fill the log with tracebacks."""

    CLIENT_FAULTS = frozenset({"Invalid UTF-8 sequence received from client."})

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if record.levelno > logging.WARNING and isinstance(msg, str) and msg in self.CLIENT_FAULTS:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure(level: str = "info", fmt: str = "text") -> None:
    """Route tidings' and uvicorn's loggers through one redacting handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.addFilter(ClientFaultFilter())
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
