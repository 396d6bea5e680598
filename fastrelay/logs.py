"""Structured logs: text for people, JSON lines for machines. Secrets are never logged:
apps are logged by id and key only."""

from __future__ import annotations

import logging
import re
import sys
import time

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_SECRET_FIELDS = {"secret", "app_secret", "admin_token", "token", "password", "cluster_secret",
                  "authorization", "auth_signature"}
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@/\s]+@")


def redact_url(s: str) -> str:
    """s with the password of every URL in it masked (`redis://:***@host:6379/0`); the rest,
    several hosts included (`redis+sentinel://:***@h1:26379,h2:26379/m`), is kept as is."""
    return _URL_PASSWORD.sub(r"\1***@", s)


def _redact(key: str, value: object) -> object:
    """Belt and braces: a field named like a secret is masked, and so is a URL's password."""
    if key.lower() in _SECRET_FIELDS:
        return "***"
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: _redact(k, v) for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={_redact(k, v)}" for k, v in record.__dict__.items() if k not in _STANDARD)
        line = (f"{time.strftime('%H:%M:%S', time.localtime(record.created))} "
                f"{record.levelname.lower():7} {record.getMessage()}" + (f" {extra}" if extra else ""))
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
