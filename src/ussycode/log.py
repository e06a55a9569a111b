"""Logging set-up. Secrets never reach the log: tokens and keys are redacted by :class:`RedactFilter`."""

from __future__ import annotations

import logging
import re

_SECRET = re.compile(r"\b(usy[01]\.[A-Za-z0-9_\-.]{8,}|ussy_[a-z]+=[A-Za-z0-9_\-]{8,})")


class RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        redacted = _SECRET.sub("[redacted]", msg)
        if redacted != msg:
            record.msg, record.args = redacted, None
        return True


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
