"""What a provider module declares about itself (its ``SPEC``), read by the pipeline through
providers/registry.py: the kind, environment variables (and which are secrets), default
endpoint, largest batch, ``[provider]`` keys with their types, and optional capabilities
(clock sync, the status query, delivery receipts pushed over HTTP).

Declarations are read once per run (campaign check, provider construction, log set-up),
never per batch: the hot path stays ``build_wire`` / ``parse_response``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from providers.base import Provider, TextLimit

if TYPE_CHECKING:  # only in annotations: `sluice status` imports no HTTP stack
    import httpx

__all__ = (
    "MIN_SECRET_LENGTH",
    "BadReceipt",
    "BadSignature",
    "ClockSync",
    "ConfigKey",
    "EnvVar",
    "Fetch",
    "ProviderKind",
    "ProviderSettings",
    "PushRequest",
    "Receipt",
    "ReceiptPush",
    "ReconcileQuery",
    "UnknownSend",
)

MIN_SECRET_LENGTH = 8
"""A shorter secret is refused as a credential (and could not be masked in logs safely)."""


@dataclass(frozen=True, slots=True)
class EnvVar:
    """An environment variable the provider reads its credentials from."""

    name: str
    secret: bool = False  # masked in every log line; refused when shorter than MIN_SECRET_LENGTH
    required: bool = True  # False: only some features need it (e.g. a reconciliation query)


@dataclass(frozen=True, slots=True)
class ConfigKey:
    """A ``[provider]`` key of the campaign file that this provider reads."""

    name: str
    type: type[str] | type[bool] | type[int] | type[float] = str
    choices: tuple[str, ...] = ()  # for strings: the allowed values (empty: any)
    default: object = None


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    """What a provider is built from: the campaign's tables as plain mappings (providers do
    not import the pipeline), the credentials' environment and the resolved endpoint."""

    endpoint: str  # scheme and host (a base URL)
    environ: Mapping[str, str]
    options: Mapping[str, Any]  # the [provider] table, every key with its value or default
    message: Mapping[str, Any]  # the [message] table, likewise
    batch_size: int
    run_id: str = ""


@dataclass(frozen=True, slots=True)
class ClockSync:
    """Providers that sign with the server's clock: ``request`` returns the time request, or
    None when this provider instance needs none; ``apply(provider, response, local midpoint)``
    sets the offset and returns it in seconds."""

    request: Callable[[Provider], httpx.Request | None]
    apply: Callable[[Provider, httpx.Response, float], float | None]


@dataclass(frozen=True, slots=True)
class UnknownSend:
    """A recipient whose outcome is unknown, as reconciliation asks the provider about it."""

    row: int
    key: str
    phone: str  # E.164 digits
    out_id: str  # the batch's OutId
    sent_at: float  # when its last attempt was sent


Fetch = Callable[["httpx.Request"], Awaitable["httpx.Response"]]
"""Sends a request (rate-limited by the caller) and returns the read response."""

Verdict = str
"""'sent' | 'failed:<code>' | 'missing' | 'error:<code>'"""

Delivery = tuple[str, str]
"""(delivered | undelivered | waiting | error, the provider's code)"""


@dataclass(frozen=True, slots=True)
class ReconcileQuery:
    """The provider's status query. Either ``lookup`` (one recipient at a time, run
    concurrently) or ``sweep`` (one pass over all of them, a verdict for each, in order)."""

    lookup: Callable[[Provider, UnknownSend, Fetch], Awaitable[Verdict]] | None = None
    sweep: Callable[[Provider, Sequence[UnknownSend], Fetch], Awaitable[list[Verdict]]] | None = None
    # The same queries read for delivery (``sluice receipts``): (verdict, code), the verdict one of
    # delivered | undelivered | waiting | error.
    delivery: Callable[[Provider, UnknownSend, Fetch], Awaitable[Delivery]] | None = None
    delivery_sweep: (
        Callable[[Provider, Sequence[UnknownSend], Fetch], Awaitable[list[Delivery]]] | None
    ) = None
    queries_per_second: float = 50.0  # the default pace
    preflight: Callable[[Provider], None] | None = None  # raises CredentialsError when unusable


class BadReceipt(ValueError):
    """A push that is not a receipt of the protocol it was sent to (answered 400)."""


class BadSignature(ValueError):
    """A push whose signature does not verify, or that no key is set to verify (answered 403)."""


@dataclass(slots=True)  # not frozen: made per receipt, and a frozen __init__ costs ~1.5 µs more
class Receipt:
    """One delivery report, before it is matched to a recipient: by its batch (``batch_ref`` or
    ``batch_id``) and the phone in it, or by ``message_id``."""

    provider: str
    phone: str
    delivered: bool
    code: str  # the provider's code (e.g. a carrier's DELIVRD)
    reported_at: float | None  # epoch seconds
    provider_id: str = ""  # the provider's id of the message, kept with the receipt
    batch_ref: str = ""  # the batch's out_id as the provider echoes it (cut to batch_ref_chars)
    batch_id: str = ""  # the provider's id of the send request (the ledger's attempt line ``id``)
    message_id: str = ""  # the id sluice chose for the recipient (ProviderKind.message_id)


@dataclass(slots=True)  # made per request, like Receipt
class PushRequest:
    """An HTTP request a provider pushed to the listener, as read."""

    method: str
    body: bytes
    content_type: str  # the media type alone, lower case
    query: Mapping[str, str]
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class ReceiptPush:
    """The provider pushes delivery receipts over HTTP: ``sluice listen`` serves them at
    ``/<token>/<path>`` (kinds speaking one receipt protocol share one declaration)."""

    path: str
    parse: Callable[[PushRequest, str | None], list[Receipt]]
    """(request, the key pushes are signed with, if set) → its receipts; [] for a push that
    settles no message (answered, not stored). Raises BadReceipt or BadSignature."""
    answer: bytes  # the reply that stops the provider's retries
    answer_type: str  # its Content-Type
    methods: frozenset[str] | None = frozenset({"POST"})  # None: any method
    key_env: str | None = None  # the environment variable holding the signing key
    batch_ref_chars: int | None = None  # the provider echoes at most this much of the out_id


@dataclass(frozen=True, slots=True)
class ProviderKind:
    """One provider API, as ``[provider] kind`` names it."""

    kind: str
    build: Callable[[ProviderSettings], Provider]  # raises ValueError on a bad campaign
    env: tuple[EnvVar, ...]
    default_endpoint: str
    max_batch: int
    config: tuple[ConfigKey, ...] = ()
    check_message: Callable[[Mapping[str, Any], Mapping[str, Any]], tuple[str, str] | None] = (
        lambda options, message: None
    )
    """(options, message) → (field, problem) for a [message] this provider cannot send."""
    test_env: Mapping[str, str] | None = None
    """The documented test credentials the simulator accepts; None: the simulator does not speak it."""
    clock_sync: ClockSync | None = None
    reconcile: ReconcileQuery | None = None
    message_id: Callable[[str, str], str] | None = None
    """(run id, recipient key) → the id the provider's receipts carry for the recipient, for
    providers whose ids sluice chooses (NXCloud's ``sysMessageId``); None: matched otherwise."""
    receipts: ReceiptPush | None = None
    text_limit: Callable[[Mapping[str, Any], Mapping[str, Any]], TextLimit | None] = (
        lambda options, message: None
    )
    """(options, message) → the longest text this provider takes, checked before sending."""
    secret_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "secret_names", tuple(v.name for v in self.env if v.secret))
