"""What a handler raises to say how its job went, other than returning."""

from __future__ import annotations


class JobError(Exception):
    """A handler's own failure with a stable code. `retryable=False` ends the
    job as `failed` at once; otherwise the attempt is retried with backoff."""

    def __init__(self, code: str, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


class Delegate(Exception):
    """Raised by a handler that cannot run this job here after all (wrong device
    type, too little memory): the job goes back for another worker, once,
    without using up an attempt."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
