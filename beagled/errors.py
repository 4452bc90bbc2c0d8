"""The one error hierarchy of beagled, filed by who is at fault.

Every error beagled raises on purpose is a ``BeagledError``; its ``code`` is the protocol error code a
client sees when one reaches the server (CONTRACT.md; ``ERROR_CODES`` below is the whole set)::

    BeagledError                      code       who is at fault
    ├── ClientError                   bad_request  the caller: a request that cannot be served as sent
    │   ├── InvalidJSON               invalid_json
    │   ├── BadRequest                bad_request
    │   │                             (protocol.RequestError wraps any of these with its request id)
    │   ├── UnknownOp                 unknown_op
    │   ├── UnsupportedVersion        unsupported_version
    │   ├── TooLarge                  too_large
    │   ├── Forbidden                 forbidden
    │   ├── NotFound                  not_found
    │   ├── Conflict                  conflict
    │   └── Unavailable               unavailable  (not the caller's doing: try again, or ask the leader)
    ├── IllegalTransition             conflict   the command, against the state it met: the pure core
    │                                            refused it (a state machine rule), changing nothing
    ├── ConfigError                   internal   the operator: a setting that cannot work (names its key)
    │   └── reload.ReloadConfigError             (also a non-retryable ReloadError)
    ├── StoreError                    unavailable  the host: the event log cannot be read or written
    │   ├── ConcurrencyError                     lost an optimistic-concurrency race
    │   └── Fenced                               a deposed leader tried to append
    ├── TrainingError                 internal   an external part: a training backend failed
    ├── AdapterError                  internal   an external part: an adapter directory is damaged
    ├── ReloadError                   internal   an external part: the inference server (``retryable``)
    └── faults.InjectedFault          internal   nobody: a fault a crash test injected (BEAGLED_FAULTS)

``ClientError`` subclasses map one-to-one onto the protocol's error codes. ``TrainingError``,
``AdapterError`` and ``ReloadError`` are failures the engine records as events and retries; they never
reach a client as-is. Third-party exceptions are translated at the adapter that meets them, with
``raise ... from e``. Errors that never leave their module (``snapshot.SnapshotError``, the training
workers' ``SpecError``, ``ctl.UsageError``) are not part of this tree.
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


# --- the command does not fit the state it met (a state-machine rule): refused, nothing changed ----


class IllegalTransition(BeagledError):
    """The pure core refused a command: applying it would break the job state machine."""

    code = "conflict"


# --- the host: the event log could not be read or written -------------------------------------


class StoreError(BeagledError):
    """The event log could not be read or written (disk full, corruption, concurrency conflict)."""

    code = "unavailable"


class ConcurrencyError(StoreError):
    """An append lost an optimistic-concurrency race on a stream version."""


class Fenced(StoreError):
    """An append by a leader whose term is older than the log's newest: it was deposed."""


# --- an external part failed: recorded as events, retried -------------------------------------


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
