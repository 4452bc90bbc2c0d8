"""The one error hierarchy of beagled, split by who is at fault.

``ClientError`` subclasses are the caller's fault and map one-to-one onto the protocol's error codes
(CONTRACT.md). ``ConfigError`` is the operator's. ``TrainingError`` and ``ReloadError`` are failures of
an external part (a backend subprocess, an inference server) that the engine records as events and
retries; they never reach a client as-is. Third-party exceptions are translated at the adapter that
meets them, with ``raise ... from e``.
"""

from __future__ import annotations


class BeagledError(Exception):
    """Root of every error beagled raises on purpose."""

    code = "internal"


# --- the client's fault: each maps onto a protocol error code -----------------------------------


class ClientError(BeagledError):
    """A request that cannot be served as sent; the message is shown to the client."""

    code = "bad_request"


class InvalidJSON(ClientError):
    code = "invalid_json"


class BadRequest(ClientError):
    code = "bad_request"


class UnknownOp(ClientError):
    code = "unknown_op"


class UnsupportedVersion(ClientError):
    code = "unsupported_version"


class TooLarge(ClientError):
    code = "too_large"


class Forbidden(ClientError):
    code = "forbidden"


class NotFound(ClientError):
    code = "not_found"


class Conflict(ClientError):
    code = "conflict"


class Unavailable(ClientError):
    code = "unavailable"


# --- the operator's fault -----------------------------------------------------------------------


class ConfigError(BeagledError):
    """A configuration that cannot work; names the key at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


# --- an external part failed: recorded as events, retried ---------------------------------------


class IllegalTransition(BeagledError):
    """The pure core refused a command: applying it would break the job state machine."""

    code = "conflict"


class StoreError(BeagledError):
    """The event log could not be read or written (disk full, corruption, concurrency conflict)."""

    code = "unavailable"


class ConcurrencyError(StoreError):
    """An append lost an optimistic-concurrency race on a stream version."""


class Fenced(StoreError):
    """An append by a leader whose term is older than the log's newest: it was deposed."""


class TrainingError(BeagledError):
    """A training backend failed: crashed, timed out, wrote garbage, or is unavailable."""

    def __init__(self, message: str, *, backend: str = "", timeout: bool = False) -> None:
        super().__init__(message)
        self.backend = backend
        self.timeout = timeout


class AdapterError(BeagledError):
    """An adapter directory is incomplete or does not match its manifest."""


class ReloadError(BeagledError):
    """The inference server could not be made to serve an adapter."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


ERROR_CODES: frozenset[str] = frozenset(
    {
        "invalid_json",
        "bad_request",
        "unknown_op",
        "unsupported_version",
        "too_large",
        "forbidden",
        "not_found",
        "conflict",
        "unavailable",
        "internal",
    }
)
