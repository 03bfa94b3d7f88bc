"""Structured logs: one line per event, `key=value` (or JSON), with the actor's name.

Callers pass redacted values (`PaymentId.redacted()`, `ServiceToken.redacted()`); nothing here
ever receives a whole payment id, token, txid or client address.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

ROOT = "anon_ticket"


class Logger:
    """A thin face over `logging` that takes fields as keyword arguments."""

    __slots__ = ("_logger", "actor")

    def __init__(self, actor: str) -> None:
        self.actor = actor
        self._logger = logging.getLogger(f"{ROOT}.{actor}")

    def _log(self, level: int, event: str, fields: Mapping[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"actor": self.actor, "fields": fields})

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)


def get_logger(actor: str) -> Logger:
    return Logger(actor)


def _value(v: Any) -> str:
    text = str(v)
    if text == "" or any(c in text for c in ' ="\n'):
        return json.dumps(text)
    return text


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        actor = getattr(record, "actor", record.name.removeprefix(f"{ROOT}."))
        parts = [f"{ts}.{int(record.msecs):03d}Z", record.levelname.lower(), f"actor={actor}",
                 _value(record.getMessage())]
        fields: Mapping[str, Any] = getattr(record, "fields", {})
        parts.extend(f"{k}={_value(v)}" for k, v in fields.items())
        if record.exc_info and record.levelno >= logging.ERROR:
            parts.append(f"error={_value(repr(record.exc_info[1]))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "actor": getattr(record, "actor", record.name),
            "event": record.getMessage(),
        }
        out.update({k: v if isinstance(v, int | float | bool | None) else str(v)
                    for k, v in getattr(record, "fields", {}).items()})
        return json.dumps(out)


def configure(default_level: str = "INFO", per_target: Mapping[str, str] | None = None,
              fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(default_level.upper())
    for target, level in (per_target or {}).items():
        logging.getLogger(target).setLevel(level.upper())
    # hypercorn's own loggers: errors only, never access lines (token paths are in URLs).
    logging.getLogger("hypercorn.access").disabled = True
    logging.getLogger("hypercorn.error").setLevel(logging.WARNING)
    # httpx logs every request URL at INFO, and token paths are in URLs.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
