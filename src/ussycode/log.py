"""Logging set-up: text or JSON lines, each with the request id being handled; secrets never reach the log.

:class:`RedactFilter` replaces anything shaped like one of our credentials (``usy0.``/``usy1.`` tokens, our cookies)
before a record is formatted, whatever logged it; :class:`RequestIdFilter` adds ``request_id`` (the HTTP request or
lobby command being handled, from :data:`ussycode.telemetry.request_id`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re

from ussycode.telemetry import request_id

_SECRET = re.compile(r"\b(usy[01]\.[A-Za-z0-9_\-.]{8,}|ussy_[a-z]+=[A-Za-z0-9_\-]{8,}|token=[A-Za-z0-9_\-]{16,})")


class RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        redacted = _SECRET.sub("[redacted]", msg)
        if redacted != msg:
            record.msg, record.args = redacted, None
        return True


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id, and the exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", "")
        if rid:
            entry["request_id"] = rid
        if record.exc_info:
            entry["exception"] = _SECRET.sub("[redacted]", self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", "")
        return f"{line} [{rid}]" if rid else line


def setup(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if str(fmt) == "json" else TextFormatter())
    handler.addFilter(RedactFilter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
