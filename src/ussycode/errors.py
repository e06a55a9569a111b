"""The one error tree of ussycode.

Every error a person can cause or see derives from :class:`UssyError`; each frontend renders it its own way
(``error: …`` on SSH, ``{"error", "code"}`` over HTTP, a page in the admin panel)::

    UssyError                 user_message, log_message, reason, http_status, exit_code
    ├── UsageError            bad arguments (exit 2, HTTP 400)
    ├── NotFound              no such VM, key, user… (HTTP 404)
    ├── Conflict              name taken, wrong state (HTTP 409)
    │   └── StateError        a lifecycle call in a state that does not allow it
    ├── Forbidden             not allowed for this actor (HTTP 403)
    │   └── CommandNotPermitted   the token does not allow this command
    ├── QuotaExceeded         over a trust-tier limit (HTTP 403)
    ├── RateLimited           too many requests (HTTP 429, carries retry_after)
    ├── Unauthenticated       no or bad credentials (HTTP 401)
    ├── RuntimeFailure        a backend failed; carries evidence (command line, console tail)
    │   └── ImageError        an image is missing, corrupt or could not be built
    ├── Unavailable           a part this needs is not configured or not running (HTTP 503)
    └── UpstreamFailure       a server we depend on failed (HTTP 502)
"""

from __future__ import annotations


class UssyError(Exception):
    """Base error: a user-facing message, a log message with detail, and a machine reason."""

    http_status = 400
    exit_code = 1
    reason = "error"

    def __init__(self, user_message: str, *, log_message: str = "", reason: str | None = None) -> None:
        super().__init__(user_message)
        self.user_message = user_message
        self.log_message = log_message or user_message
        if reason is not None:
            self.reason = reason


class UsageError(UssyError):
    http_status = 400
    exit_code = 2
    reason = "usage"

    def __init__(self, user_message: str, *, usage: str = "", **kw: str) -> None:
        super().__init__(user_message, **kw)
        self.usage = usage


class NotFound(UssyError):
    http_status = 404
    reason = "not_found"


class Conflict(UssyError):
    http_status = 409
    reason = "conflict"


class StateError(Conflict):
    reason = "wrong_state"


class Forbidden(UssyError):
    http_status = 403
    reason = "forbidden"


class CommandNotPermitted(Forbidden):
    """The actor's token does not allow this command (``/exec`` answers 403 and audits it)."""

    reason = "command_not_permitted"

    def __init__(self, user_message: str, *, command: str, **kw: str) -> None:
        super().__init__(user_message, **kw)
        self.command = command


class QuotaExceeded(Forbidden):
    reason = "quota"


class Suspended(Forbidden):
    """The account is suspended: it can do nothing until an operator unsuspends it."""

    reason = "suspended"

    def __init__(self, why: str = "", **kw: str) -> None:
        text = "your account is suspended" + (f" ({why})" if why else "")
        super().__init__(text + "; contact the operator of this server", **kw)


class Unauthenticated(UssyError):
    http_status = 401
    reason = "unauthenticated"


class RateLimited(UssyError):
    http_status = 429
    reason = "rate_limited"

    def __init__(self, user_message: str, *, retry_after: float, **kw: str) -> None:
        super().__init__(user_message, **kw)
        self.retry_after = retry_after


class RuntimeFailure(UssyError):
    """A backend failed. ``evidence`` carries what helps a person fix it (argv, console tail)."""

    http_status = 500
    reason = "runtime"

    def __init__(self, user_message: str, *, evidence: str = "", **kw: str) -> None:
        super().__init__(user_message, **kw)
        self.evidence = evidence

    def __str__(self) -> str:
        if self.evidence:
            return f"{self.user_message}\n{self.evidence}"
        return self.user_message


class ImageError(RuntimeFailure):
    reason = "image"


class Unavailable(UssyError):
    """A part of the server this needs is not configured or not running (``503``)."""

    http_status = 503


class UpstreamFailure(UssyError):
    """A server we depend on (a mail relay, an LLM provider) failed or timed out (``502``)."""

    http_status = 502

