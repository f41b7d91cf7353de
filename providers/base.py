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
    SPLIT       the provider refused the whole call because of some of its
                recipients (a bad number, blacklisted, over-long text), so
                nothing of it was sent: the engine splits the batch until the
                recipients at fault stand alone; only they are FAILED (or what
                ``BatchOutcome.extra["alone"]``, an Outcome, says: DEFER for a
                per-number frequency limit)
    UNKNOWN     may or may not have reached the provider (read timeout,
                connection lost after sending, 5xx): never re-sent silently
"""

from __future__ import annotations

import enum
import math
import re
import ssl
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # httpx is imported where a request or headers are built: not on import
    import httpx

__all__ = (
    "CERTIFICATE_CODE",
    "CONNECT_CODES",
    "ENDPOINT_STOP_CODES",
    "Batch",
    "BatchOutcome",
    "Clock",
    "CredentialsError",
    "Message",
    "NonceSource",
    "Outcome",
    "Provider",
    "RecipientOutcome",
    "Response",
    "TextLimit",
    "WireRequest",
    "WireResponse",
    "certificate_error",
    "classify_transport_error",
    "fill_template",
    "match_entries",
    "result_code",
    "retry_after_seconds",
    "sign_and_params",
    "summarize",
    "whole_request",
)


class CredentialsError(Exception):
    """Credentials are missing from the environment (names the variable, never a value)."""


class Outcome(enum.Enum):
    SENT = "sent"
    FAILED = "failed"
    FATAL = "fatal"
    THROTTLED = "throttled"
    RETRY = "retry"
    DEFER = "deferred"
    SPLIT = "split"
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
    ``parent`` is the batch this one is a part of, when a refused batch was split.
    """

    id: int
    messages: list[Message]
    attempt: int = 1
    out_id: str = ""
    parent: int | None = None


@dataclass(slots=True)
class RecipientOutcome:
    """A per-recipient result, for providers that report one (SUBMAIL, NXCloud).

    ``message`` is the provider's reason for this recipient (NXCloud's item ``message``).
    """

    outcome: Outcome
    code: str | None = None
    provider_id: str | None = None
    fee: int | None = None
    message: str | None = None


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


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NOT_ON_THE_WIRE = re.compile(r"[\r\n\x00]|[^\x00-\xff]")
_URL_BREAK = re.compile(r"[\x00-\x20\x7f]")
_TOKENS_SEEN: set[str] = set()


@dataclass(frozen=True, slots=True)
class WireRequest:
    """A signed request exactly as it goes on the wire: what the engine's transport sends.

    ``url`` is absolute and already percent-encoded (sent byte for byte: what was
    signed is what is sent); ``headers`` are (name, value) pairs, ``Host`` and
    ``Content-Length`` being added by the transport when absent.

    Built by a provider module, it is checked at once: a header the wire cannot carry (CR,
    LF or NUL, a character outside latin-1, a name that is not a token) or a URL with
    whitespace or non-ASCII is a bug, raised as ``ValueError`` before the intent line is
    written. The message names the header, never its value (it may be a credential).
    """

    method: str
    url: str
    headers: Sequence[tuple[str, str]]
    content: bytes = b""

    def __post_init__(self) -> None:
        headers = self.headers
        # One scan of all the values (every request pays it); the header is named on failure.
        if _NOT_ON_THE_WIRE.search("".join([v for _, v in headers])):
            name = next(n for n, v in headers if _NOT_ON_THE_WIRE.search(v))
            problem = "its value holds CR, LF, NUL or a character outside latin-1"
            raise ValueError(f"request header {name}: {problem}")
        for name, _ in headers:
            if name not in _TOKENS_SEEN:
                if not _TOKEN.fullmatch(name):
                    raise ValueError(f"request header name {name[:40]!r} is not an HTTP token")
                if len(_TOKENS_SEEN) < 256:  # a provider's few header names, checked once
                    _TOKENS_SEEN.add(name)
        if not self.url.isascii() or _URL_BREAK.search(self.url) or not _TOKEN.fullmatch(self.method):
            raise ValueError("request URL or method holds whitespace, a control or a non-ASCII character")

    @classmethod
    def from_httpx(cls, request: httpx.Request) -> WireRequest:
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in request.headers.raw
            if k.lower() != b"content-length"
        ]
        return cls(request.method, str(request.url), headers, request.content)

    def to_httpx(self) -> httpx.Request:
        import httpx

        return httpx.Request(
            self.method, httpx.URL(self.url), headers=list(self.headers), content=self.content
        )


class Response(Protocol):
    """What a provider reads of a response: ``httpx.Response`` and :class:`WireResponse` both are."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> httpx.Headers: ...

    @property
    def content(self) -> bytes: ...


class WireResponse:
    """A whole response as the engine's transport received it; headers parsed on first use
    (a success rarely needs them, and building ``httpx.Headers`` costs more than the parse)."""

    __slots__ = ("_headers", "_raw", "content", "status_code")

    def __init__(self, status_code: int, raw_headers: list[tuple[bytes, bytes]], content: bytes) -> None:
        self.status_code = status_code
        self.content = content
        self._raw = raw_headers
        self._headers: httpx.Headers | None = None

    @property
    def headers(self) -> httpx.Headers:
        if self._headers is None:
            import httpx

            self._headers = httpx.Headers(self._raw)
        return self._headers

    def __repr__(self) -> str:
        return f"<WireResponse [{self.status_code}]>"


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

    def build_wire(self, batch: Batch) -> WireRequest:
        """The same request as :meth:`build_request`, as the engine sends it."""
        ...

    def parse_response(self, batch: Batch, response: Response) -> BatchOutcome:
        """Classify a received response (its body is already read)."""
        ...


CERTIFICATE_CODE = "CertificateVerifyFailed"
"""The code of a request that failed because the server's TLS certificate was not accepted."""
CONNECT_CODES = frozenset({"ConnectError", "ConnectTimeout"})
"""Codes of attempts that never reached the endpoint (refused, unreachable, DNS, connect timeout)."""
ENDPOINT_STOP_CODES = CONNECT_CODES | {CERTIFICATE_CODE}
"""Codes with which the endpoint, not the provider, stops a run (pipeline/dispatch.py)."""


def certificate_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind ``exc`` (its cause chain), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def classify_transport_error(exc: httpx.TransportError) -> BatchOutcome:
    """Classify an exception raised while sending a request.

    Only errors raised before any byte of the request can have been
    processed are retryable; everything else is ambiguous. A certificate the TLS
    library does not accept (untrusted, expired, for another host) is FATAL: no retry
    can change it, and every request would fail the same way.
    """
    import httpx

    name = type(exc).__name__
    cert = certificate_error(exc)
    if cert is not None:
        message = str(exc)
        if str(cert) not in message:
            message = f"{message}: {cert}" if message else str(cert)
        return BatchOutcome(Outcome.FATAL, code=CERTIFICATE_CODE, message=message)
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return BatchOutcome(Outcome.RETRY, code=name, message=str(exc) or None)
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.ProxyError):
        return BatchOutcome(Outcome.FATAL, code=name, message=str(exc) or None)
    return BatchOutcome(Outcome.UNKNOWN, code=name, message=str(exc) or None)


# -- helpers for providers that report per-recipient results ---------------------------------


def match_entries(
    entries: Sequence[object],
    keys: Sequence[str],
    entry_keys: Callable[[object], Iterable[str]],
) -> list[object | None]:
    """Pair result entries with the batch's recipients.

    ``keys[i]`` identifies recipient ``i`` (phone, message id); ``entry_keys`` gives the
    candidate keys an entry carries. An entry goes to the recipient with its key (its own
    position first, then the first free one); entries without a usable key fall back to
    their position, but only when there are exactly as many entries as recipients.
    Recipients left without an entry get ``None``.
    """
    out: list[object | None] = [None] * len(keys)
    slots: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        slots.setdefault(k, []).append(i)
    positional = len(entries) == len(keys)
    leftover: list[int] = []
    for pos, entry in enumerate(entries):
        target = None
        for k in entry_keys(entry):
            free = [i for i in slots.get(k, ()) if out[i] is None]
            if free:
                target = pos if pos in free else free[0]
                break
        if target is None:
            leftover.append(pos)
        else:
            out[target] = entry
    if positional:
        for pos in leftover:
            if out[pos] is None:
                out[pos] = entries[pos]
    return out


_NOT_ACCEPTED = frozenset({Outcome.RETRY, Outcome.THROTTLED, Outcome.FATAL})


def summarize(
    recipients: Sequence[RecipientOutcome],
    *,
    provider_id: str | None = None,
    extra: Mapping[str, object] | None = None,
    retry_after: float | None = None,
) -> BatchOutcome:
    """One :class:`BatchOutcome` for per-recipient results.

    The engine retries or stops on the *batch* outcome, so it is only RETRY, THROTTLED or
    FATAL (without ``recipients``) when no recipient at all was accepted. Otherwise it is
    SENT if any was accepted, else UNKNOWN if any may have been, else FAILED if all failed,
    else DEFER; recipients refused with a RETRY/THROTTLED/FATAL class are then written as
    deferred by the ledger (a later resume sends them).
    """
    kinds = {r.outcome for r in recipients}
    extra = dict(extra or {})
    kind: Outcome
    if kinds and kinds <= _NOT_ACCEPTED:
        kind = next(k for k in (Outcome.FATAL, Outcome.THROTTLED, Outcome.RETRY) if k in kinds)
        first = next(r for r in recipients if r.outcome is kind)
        return BatchOutcome(
            kind, code=first.code, provider_id=provider_id, retry_after=retry_after, extra=extra
        )
    if Outcome.SENT in kinds:
        kind = Outcome.SENT
    elif Outcome.UNKNOWN in kinds:
        kind = Outcome.UNKNOWN
    elif kinds == {Outcome.FAILED}:
        kind = Outcome.FAILED
    else:
        kind = Outcome.DEFER
    codes = {r.code for r in recipients}
    counts: dict[str, int] = {}
    for r in recipients:
        counts[r.outcome.value] = counts.get(r.outcome.value, 0) + 1
    return BatchOutcome(
        kind,
        code=codes.pop() if len(codes) == 1 and len(kinds) == 1 else None,
        message=", ".join(f"{n} {name}" for name, n in counts.items()),
        provider_id=provider_id,
        recipients=list(recipients),
        extra=extra,
    )


def whole_request(kind: Outcome, recipients: int) -> Outcome:
    """A per-recipient class (FAILED) given for a whole request of several recipients.

    Nothing was sent and we cannot tell whose fault it is, so no recipient is failed:
    they are deferred (the code is kept) and a resume, or a smaller batch, sends them.
    """
    return Outcome.DEFER if kind is Outcome.FAILED and recipients > 1 else kind


def result_code(value: object) -> str | None:
    """A result code as text (providers send both ``"108"`` and ``108``)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))[:64]
    if isinstance(value, str) and value.strip():
        return value.strip()[:64]
    return None


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """``Retry-After`` in seconds, when usable (capped at an hour)."""
    raw = headers.get("retry-after")
    try:
        seconds = float(raw.strip()) if raw is not None else math.nan
    except ValueError:
        return None
    return min(seconds, 3600.0) if math.isfinite(seconds) and seconds > 0 else None


# -- the longest text a provider takes ------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill_template(template: str, params: Mapping[str, str]) -> str:
    """A provider-held template's text (``${name}`` placeholders) with ``params`` filled in;
    a placeholder without a parameter stays as written."""
    return _PLACEHOLDER.sub(lambda g: params.get(g.group(1), g.group(0)), template)


def sign_and_params(message: Message) -> str:
    """What is known of a text rendered by the provider from its own template: ``【sign】`` and
    the parameter values (a lower bound of its length when every parameter is used)."""
    return f"【{message.sign_name}】" + "".join(message.params.values())


def _count(n: int) -> str:
    return f"{n:,}".replace(",", " ")


@dataclass(frozen=True, slots=True)
class TextLimit:
    """The longest text one recipient may get from a provider, counted as the provider counts it.

    ``text`` gives the counted text of a rendered message (the signature included where the
    provider counts it), in characters (code points). ``whole`` is False when the provider
    holds the template and its text is not known here: ``text`` is then only what is known
    (signature and parameter values), a lower bound of the real length.
    """

    provider: str
    max_length: int
    text: Callable[[Message], str]
    whole: bool = True

    def problem(self, message: Message) -> str | None:
        """None when ``message`` fits; else the reason it is rejected."""
        n = len(self.text(message))
        if n <= self.max_length:
            return None
        return f"text is {_count(n)} characters; {self.provider} allows {_count(self.max_length)}"
