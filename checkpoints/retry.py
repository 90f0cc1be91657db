"""The retry policy of every storage request: transient errors are retried with jittered exponential backoff,
everything else fails at once. Which errors are transient is the backend's call (s3.py knows HTTP statuses)."""

from __future__ import annotations

import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import StorageError

logger = logging.getLogger(__name__)
_T = TypeVar("_T")
MAX_BACKOFF_S = 30.0
# Generic "the network hiccuped" errors; a backend adds its own (HTTP 5xx, throttling, ...).
TRANSIENT_TYPES: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, socket.timeout)


def one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def walk_causes(exc: BaseException):
    """`exc` and its cause/context chain (wrapped errors, e.g. s3transfer's S3UploadFailedError over ClientError)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_transient(exc: BaseException) -> bool:
    """True for dropped or refused connections and timeouts anywhere in the cause chain."""
    return any(isinstance(e, TRANSIENT_TYPES) for e in walk_causes(exc))


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` extra attempts; the n-th retry waits backoff_s * 2**(n-1), capped, times a jitter in [0.5, 1]."""

    retries: int
    backoff_s: float
    errors: tuple[type[BaseException], ...] = (OSError,)  # what a request may raise; others propagate unchanged
    transient: Callable[[BaseException], bool] = is_transient

    def call(self, what: str, fn: Callable[[], _T]) -> _T:
        """Run `fn` under the policy. FileNotFoundError passes through (an answer, not a failure); other errors
        in `errors` become StorageError naming `what`."""
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except FileNotFoundError:
                raise
            except self.errors as exc:
                if not self.transient(exc):
                    raise StorageError(f"{what} failed: {one_line(exc)}") from exc
                if attempt == attempts:
                    raise StorageError(f"{what} failed after {attempts} attempts: {one_line(exc)}") from exc
                # Jitter keeps ranks that failed together from retrying in lockstep.
                delay = min(MAX_BACKOFF_S, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                logger.warning(
                    "%s: attempt %d/%d failed (%s); retrying in %.2fs", what, attempt, attempts, one_line(exc), delay
                )
                time.sleep(delay)
        raise AssertionError("unreachable")
