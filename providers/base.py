"""The contract between the engine and a provider module.

A provider module is sans-I/O: it turns a :class:`Batch` into a signed
``httpx.Request`` and turns the response (or a transport error) into a
:class:`BatchOutcome`. The engine (``pipeline.dispatch``) does every I/O.

Outcome classes, from PROTOCOLS.md::

    SENT        the provider accepted the recipient
    FAILED      permanent, per recipient (bad number, blocklisted...)
    FATAL       permanent for the whole request (credentials, balance,
                template): stop the run, the recipients stay pending
    THROTTLED   the provider refused before processing (rate limit):
                slow down and retry, never a recipient failure
    RETRY       provably not processed (connect error, signature or
                timestamp rejected): retry with backoff
    DEFER       not processed now and pointless to retry at once
                (per-number frequency limit): leave for a later resume
    UNKNOWN     may or may not have reached the provider (read timeout,
                connection lost after sending, 5xx): never re-sent silently
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import httpx

__all__ = (
    "Batch",
    "BatchOutcome",
    "Clock",
    "Message",
    "NonceSource",
    "Outcome",
    "Provider",
    "RecipientOutcome",
    "classify_transport_error",
)


class Outcome(enum.Enum):
    SENT = "sent"
    FAILED = "failed"
    FATAL = "fatal"
    THROTTLED = "throttled"
    RETRY = "retry"
    DEFER = "deferred"
    UNKNOWN = "unknown"


@dataclass(slots=True)
class Message:
    """One rendered recipient, ready to be batched.

    ``phone`` is E.164 digits without ``+`` (``8613800000000``); providers
    format it as their API wants. ``params`` are the rendered template
    parameters, ``content`` the rendered free text (providers that send text).
    """

    row: int
    key: str
    phone: str
    params: dict[str, str]
    sign_name: str
    content: str | None = None


@dataclass(slots=True)
class Batch:
    """Messages sent in one provider request.

    ``id`` is unique within a run; ``out_id`` is unique per request attempt
    and is the reconciliation handle sent to the provider (Aliyun ``OutId``).
    """

    id: int
    messages: list[Message]
    attempt: int = 1
    out_id: str = ""


@dataclass(slots=True)
class RecipientOutcome:
    """A per-recipient result, for providers that report one (SUBMAIL)."""

    outcome: Outcome
    code: str | None = None
    provider_id: str | None = None
    fee: int | None = None


@dataclass(slots=True)
class BatchOutcome:
    """What one request attempt came to.

    ``outcome`` applies to every recipient unless ``recipients`` is given
    (same order and length as ``batch.messages``).
    """

    outcome: Outcome
    code: str | None = None
    message: str | None = None
    provider_id: str | None = None
    retry_after: float | None = None
    recipients: Sequence[RecipientOutcome] | None = None
    extra: Mapping[str, object] = field(default_factory=dict)


Clock = Callable[[], float]
"""Wall-clock seconds since the epoch (``time.time``); injected for tests."""

NonceSource = Callable[[], str]
"""A unique string per call (``uuid.uuid4().hex``); injected for tests."""


class Provider(Protocol):
    """What the engine needs from a provider module."""

    name: str
    max_batch_size: int

    def batch_key(self, message: Message) -> Hashable:
        """Messages with equal keys may share a request."""
        ...

    def build_request(self, batch: Batch) -> httpx.Request:
        """A fully signed request for ``batch`` (uses the clock and nonce source)."""
        ...

    def parse_response(self, batch: Batch, response: httpx.Response) -> BatchOutcome:
        """Classify a received response (its body is already read)."""
        ...


def classify_transport_error(exc: httpx.TransportError) -> BatchOutcome:
    """Classify an exception raised while sending a request.

    Only errors raised before any byte of the request can have been
    processed are retryable; everything else is ambiguous.
    """
    name = type(exc).__name__
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return BatchOutcome(Outcome.RETRY, code=name, message=str(exc) or None)
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.ProxyError):
        return BatchOutcome(Outcome.FATAL, code=name, message=str(exc) or None)
    return BatchOutcome(Outcome.UNKNOWN, code=name, message=str(exc) or None)
