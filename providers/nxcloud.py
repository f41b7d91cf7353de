"""NXCloud (牛信) batch SMS ``POST /v1/sms/multi/mt``: signing, requests, defensive outcomes.

Sans-I/O. Facts are from PROTOCOLS.md §3. One request carries up to 200 items, each with
its own phone (country code + number, no ``+``) and text, so any messages share a request.

Signature: ``sign`` = lower-case hex md5 (or sha256, announced by the header
``algorithm: sha256``) of ``accessKey=…&action=…&bizType=…&ts=…&body=<JSON as sent>
&accessSecret=…``. The body is serialised once, and those same bytes are signed and sent:
key order or whitespace changes the signature. ``ts`` is milliseconds, ±60 s.

Each item carries ``sysMessageId`` = :func:`message_id` (run tag + ``-`` + 32 hex of
sha256(key)): deterministic per recipient, the same on every attempt and resume, and the
handle for DRs and record queries. It is recomputable from the ledger's key, so a batch
that succeeds as a whole is recorded without per-recipient ids.

Responses (the seed, ``seeds/003_*.txt``, is the oracle)
---------------------------------------------------------
``{"code": <int>, "message": "...", "data": [...] | null}``; each ``data[]`` item has
``phone``, ``messageid`` (our ``sysMessageId``), ``status`` ``Success``/``Failure`` and, on a
failure, ``message``. ``code`` 0 means the request was processed, not that every item was
sent (the seed's "partial failure" example), so with ``code`` 0 (and -1) each recipient
gets its item's outcome:

* ``Success`` → SENT; ``Failure`` → FAILED, code ``Failure``, the item's ``message`` as the
  reason; except a ``message`` that is the seed's text for 13007/13008 (a rate limit,
  INFERENCE: the seed gives no per-item codes) → DEFER;
* items are matched to recipients by ``messageid`` = the ``sysMessageId`` sent (the seed:
  "the response's messageid uses it"); an item without a matching id goes to the recipient
  with its ``phone`` only when that number occurs once in the batch; never by position (the
  seed promises no order, and its own example answers a number other than the one sent);
* a recipient left without an item, or given two that disagree, is UNKNOWN: it may or may
  not have been queued, and only a record query or DR can tell (never SENT, never re-sent
  blindly); items matching no recipient are dropped;
* ``code`` 0 without a ``data`` array is UNKNOWN for the same reason.

Any other ``code`` applies to the whole request (the seed's error examples carry
``data: null``): see :data:`CODE_CLASSES` and :func:`classify`.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import orjson

from providers import nxcloud_receipts
from providers.aliyun_query import beijing_date
from providers.base import (
    Batch,
    BatchOutcome,
    Clock,
    CredentialsError,
    Message,
    Outcome,
    Provider,
    RecipientOutcome,
    Response,
    TextLimit,
    WireRequest,
    result_code,
    retry_after_seconds,
    summarize,
)
from providers.spec import (
    ConfigKey,
    EnvVar,
    Fetch,
    ProviderKind,
    ProviderSettings,
    ReconcileQuery,
    UnknownSend,
)

__all__ = (
    "CODE_CLASSES",
    "DEFAULT_ENDPOINT",
    "DEFAULT_RECORD_URL",
    "MAX_BATCH",
    "SPEC",
    "CredentialsError",
    "NxcloudCredentials",
    "NxcloudSms",
    "RecordResult",
    "classify",
    "item_outcome",
    "message_id",
    "nx_sign",
    "nx_string_to_sign",
    "parse_record",
    "verify",
)

DEFAULT_ENDPOINT = "https://api2.nxcloud.com/v1/sms/multi/mt"
# Documented as http://; the same host serves the /api/ paths over TLS (mtsend_v2), and
# this request carries the app secret in the form, so TLS is the default.
DEFAULT_RECORD_URL = "https://api2.nxcloud.com/api/sms/get"
MAX_BATCH = 200
BIZ_TYPE = "3"  # SMS
ACTION = "mtsend"


# -- credentials --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class NxcloudCredentials:
    """``app_secret`` (the SMS app's secret key) is only needed for the legacy record query."""

    access_key: str
    access_secret: str = field(repr=False)
    app_key: str
    app_secret: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> NxcloudCredentials:
        """Read ``NXCLOUD_ACCESS_KEY``, ``NXCLOUD_ACCESS_SECRET``, ``NXCLOUD_APP_KEY``
        and, optionally, ``NXCLOUD_APP_SECRET``."""
        names = ("NXCLOUD_ACCESS_KEY", "NXCLOUD_ACCESS_SECRET", "NXCLOUD_APP_KEY")
        values = [environ.get(name, "").strip() for name in names]
        missing = [name for name, value in zip(names, values, strict=True) if not value]
        if missing:
            raise CredentialsError(f"environment variable {' and '.join(missing)} is not set or empty")
        return cls(values[0], values[1], values[2], environ.get("NXCLOUD_APP_SECRET", "").strip() or None)


# -- signing --------------------------------------------------------------------------------
Algorithm = Literal["md5", "sha256"]


def nx_string_to_sign(
    access_key: str, action: str, biz_type: str, ts: str, body: bytes | str | None, access_secret: str
) -> bytes:
    """``accessKey=…&action=…&bizType=…&ts=…[&body=…]&accessSecret=…`` as UTF-8.

    ``&body=`` is left out for an empty body (and for form APIs: pass ``None``).
    """
    raw = body.encode() if isinstance(body, str) else body
    head = f"accessKey={access_key}&action={action}&bizType={biz_type}&ts={ts}".encode()
    middle = b"&body=" + raw if raw else b""
    return head + middle + b"&accessSecret=" + access_secret.encode()


def nx_sign(
    access_key: str,
    action: str,
    biz_type: str,
    ts: str,
    body: bytes | str | None,
    access_secret: str,
    algorithm: Algorithm = "md5",
) -> str:
    """Lower-case hex md5 (default) or sha256 of :func:`nx_string_to_sign`."""
    data = nx_string_to_sign(access_key, action, biz_type, ts, body, access_secret)
    return hashlib.md5(data).hexdigest() if algorithm == "md5" else hashlib.sha256(data).hexdigest()


def verify(headers: Mapping[str, str], body: bytes, access_secret: str) -> bool:
    """Check a received request; ``headers`` keyed by lower-case name."""
    try:
        algorithm = headers.get("algorithm", "md5").lower()
        if algorithm not in ("md5", "sha256"):
            return False
        expected = nx_sign(
            headers["accesskey"],
            headers["action"],
            headers["biztype"],
            headers["ts"],
            body,
            access_secret,
            "md5" if algorithm == "md5" else "sha256",
        )
    except KeyError:
        return False
    given = headers.get("sign", "")
    return given.isascii() and hmac.compare_digest(expected.encode(), given.encode())


_TAG_DROP = re.compile(r"[^0-9A-Za-z-]")


def message_id(run_tag: str, key: str) -> str:
    """``sysMessageId`` for a recipient: ``<run tag>-<32 hex of sha256(key)>``.

    The tag keeps ``[0-9A-Za-z-]`` and at most 16 characters (an empty tag gives the bare
    digest), so the id is 32-49 characters of ``[0-9a-zA-Z-]`` as NXCloud requires.
    """
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    tag = _clean_tag(run_tag)
    return f"{tag}-{digest}" if tag else digest


@functools.lru_cache(maxsize=64)
def _clean_tag(run_tag: str) -> str:
    """The id's prefix (one per run: cached, not cleaned again for every recipient)."""
    return _TAG_DROP.sub("", run_tag)[:16]


# -- outcome classes (the seed's code table; PROTOCOLS.md §3.5) --------------------------------
_CLASSES: dict[Outcome, tuple[str, ...]] = {
    Outcome.SENT: ("0",),  # processed: each item carries its own status
    # "Failure" with nothing saying whether anything was queued (unless items say so)
    Outcome.UNKNOWN: ("-1",),
    Outcome.FATAL: (
        # 1000-10XX, the common auth codes: missing headers, parameter, signature, accessKey
        "1001", "1002", "1003", "1005",
        # customer unavailable, balance, parameter error, app/key, IP whitelist, source address
        "1100", "1102", "9000", "13002", "13003", "13006",
    ),
    # Stale ts: refused before processing; a request signed now is safe to send.
    Outcome.RETRY: ("1004",),
    Outcome.THROTTLED: ("13008",),
    # 5 messages per number per hour: not worth retrying now, never a reason to stop the run.
    Outcome.DEFER: ("13007",),
    # Refused because of some items (over-long or empty/illegal text, a bad number, too many
    # numbers for a verification channel): nothing was sent, the engine splits the batch.
    Outcome.SPLIT: ("13001", "13005", "13009", "13010"),
}  # fmt: skip
CODE_CLASSES: Mapping[str, Outcome] = {code: kind for kind, codes in _CLASSES.items() for code in codes}

_PENDING_IDS = 100_000  # ids remembered between a request and its answer (~10 MB at most)
ITEM_FAILURE = "Failure"  # an item's status, also the code a failed item is recorded with
# Top-level codes whose data[] items are read: 0 (processed) and -1 (unless items say otherwise).
_PER_ITEM = frozenset({"0", "-1"})
# Item failure reasons that are a rate limit rather than a fault of the recipient: the seed's
# texts of 13007 and 13008 (INFERENCE: an item reports no code, only this text).
_DEFERRING_REASONS = ("rate limit exceeded", "tps limit exceeded")


def classify(code: str | None, http_status: int) -> Outcome:
    """The class of an NXCloud top-level ``code`` (``None``: no usable code).

    Unknown codes: on a 5xx the request may have been processed (UNKNOWN); a 429 is a
    throttle; anything else is FATAL: most likely a refusal the seed does not list
    (1000-10XX are auth errors); FATAL stops the run with the code shown and leaves the
    recipients pending for a resume, where FAILED would drop them for good and SENT would
    be a guess.
    """
    known = CODE_CLASSES.get(code) if code is not None else None
    if known is not None:
        return known
    if http_status >= 500:
        return Outcome.UNKNOWN
    if http_status == 429:
        return Outcome.THROTTLED
    return Outcome.FATAL


def item_outcome(item: Mapping[str, object]) -> RecipientOutcome:
    """One ``data[]`` item's outcome: ``status`` Success/Failure, ``message`` the reason."""
    status = item.get("status")
    status = status.lower() if isinstance(status, str) else None
    message_id = item.get("messageid")
    provider_id = message_id if isinstance(message_id, str) and message_id else None
    if status == "success":
        return RecipientOutcome(Outcome.SENT, provider_id=provider_id)
    reason = item.get("message")
    reason = reason[:500] if isinstance(reason, str) and reason else None
    if status == "failure":
        deferred = reason is not None and reason.lower().startswith(_DEFERRING_REASONS)
        kind = Outcome.DEFER if deferred else Outcome.FAILED
        return RecipientOutcome(kind, code=ITEM_FAILURE, provider_id=provider_id, message=reason)
    # No status, or one the seed does not list: whether it was queued is unknown.
    code = result_code(item.get("status")) or "NoStatus"
    return RecipientOutcome(Outcome.UNKNOWN, code=code, provider_id=provider_id, message=reason)


def _text(data: Mapping[str, object]) -> str | None:
    for name in ("message", "msg", "result"):
        value = data.get(name)
        if isinstance(value, str) and value:
            return value[:500]
    return None


def _loads(content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None


def _all_sent(items: list[object], ids: list[str]) -> bool:
    """Every item ``Success`` and every id among theirs (then no recipient can be in doubt)."""
    answered: set[str] = set()
    for item in items:
        if not isinstance(item, dict) or item.get("status") != "Success":
            return False
        item_id = item.get("messageid")
        if isinstance(item_id, str):
            answered.add(item_id)
    return answered.issuperset(ids)


# -- legacy record query ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RecordResult:
    """``/api/sms/get``: ``code`` "0" with the ``row`` (``msgid``, ``phone``, ``dr`` =
    ``DELIVRD``…, ``dr_status``, ``dr_time``, ``billing_*``), else an error code
    (1 params invalid, 2 keys invalid, 3 older than 31 days) or ``HTTP<status>``."""

    code: str
    row: dict[str, object] | None = None
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.code == "0" and self.row is not None


def parse_record(response: httpx.Response) -> RecordResult:
    """Read a record-query response; never raises."""
    data = _loads(response.content)
    if not isinstance(data, dict):
        return RecordResult(f"HTTP{response.status_code}", message="unreadable response")
    code = result_code(data.get("code")) or f"HTTP{response.status_code}"
    row = data.get("row")
    return RecordResult(code, row if isinstance(row, dict) and code == "0" else None, _text(data))


# -- the provider ---------------------------------------------------------------------------
class NxcloudSms:
    """``/v1/sms/multi/mt``: up to 200 items, each with its own number and text."""

    name = "nxcloud"
    max_text_length = 1000  # per item, the content as sent (PROTOCOLS.md §3.4, seed: code 13001)

    @staticmethod
    def text_limit() -> TextLimit:
        """Each item's ``content`` is sent as rendered: it is the whole text counted."""
        return TextLimit("nxcloud", NxcloudSms.max_text_length, lambda m: m.content or "")

    def __init__(
        self,
        *,
        credentials: NxcloudCredentials,
        run_tag: str = "",
        batch_size: int = MAX_BATCH,
        algorithm: Algorithm = "md5",
        source_address: str | None = None,
        endpoint: str = DEFAULT_ENDPOINT,
        record_url: str = DEFAULT_RECORD_URL,
        clock: Clock = time.time,
        id_for: Callable[[str, str], str] | None = None,
    ) -> None:
        """``run_tag``: the prefix of every ``sysMessageId`` (the run id: it must stay the
        same across resumes). ``source_address``: the sender id for every item. ``id_for``
        replaces :func:`message_id` (``(run_tag, key) -> sysMessageId``)."""
        if algorithm not in ("md5", "sha256"):
            raise ValueError(f"algorithm must be md5 or sha256, not {algorithm!r}")
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH}")
        if source_address is not None and not re.fullmatch(r"[0-9A-Za-z]{1,20}", source_address):
            raise ValueError("source_address must be 1-20 letters or digits")
        for url in (endpoint, record_url):
            parsed = httpx.URL(url)
            if parsed.scheme not in ("http", "https") or not parsed.host:
                raise ValueError(f"URLs must be http(s), not {url!r}")
        self.max_batch_size = batch_size
        self.run_tag = run_tag
        self.algorithm: Algorithm = algorithm
        self._creds = credentials
        self._source = source_address
        self._url = endpoint
        self._record_url = record_url
        self._clock = clock
        self._id_for = id_for or message_id
        # key -> sysMessageId of recipients sent and not yet answered: body() hashes each key
        # once and the answer is read with the same ids (a SHA-256 per recipient, not two)
        self._pending_ids: dict[str, str] = {}
        self._pending_tag = run_tag

    def message_id(self, message: Message) -> str:
        """The ``sysMessageId`` sent for ``message``."""
        return self._id_for(self.run_tag, message.key)

    def _ids(self, messages: Sequence[Message], *, keep: bool) -> list[str]:
        """The ``sysMessageId`` of each message: remembered when sent (``keep``), taken back
        when the answer is read. At most ``_PENDING_IDS`` are remembered; any other is hashed."""
        pending = self._pending_ids
        if self._pending_tag != self.run_tag or len(pending) > _PENDING_IDS:
            pending.clear()
            self._pending_tag = self.run_tag
        remembered = pending.get if keep else pending.pop
        out: list[str] = []
        for m in messages:
            mid = remembered(m.key, None)
            if mid is None:
                mid = self._id_for(self.run_tag, m.key)
                if keep:
                    pending[m.key] = mid
            out.append(mid)
        return out

    def batch_key(self, message: Message) -> Hashable:
        return ACTION  # every item carries its own number and text

    def body(self, batch: Batch) -> bytes:
        """The JSON body for ``batch``, exactly as sent and signed."""
        items: list[dict[str, str]] = []
        for m, mid in zip(batch.messages, self._ids(batch.messages, keep=True), strict=True):
            if m.content is None:
                raise ValueError("NXCloud needs rendered content (a content template)")
            item = {"phone": m.phone, "content": m.content, "sysMessageId": mid}
            if self._source:
                item["sourceAddress"] = self._source
            items.append(item)
        return orjson.dumps({"appKey": self._creds.app_key, "items": items})

    def build_wire(self, batch: Batch) -> WireRequest:
        return WireRequest.from_httpx(self.build_request(batch))

    def build_request(self, batch: Batch) -> httpx.Request:
        body = self.body(batch)
        creds = self._creds
        ts = str(round(self._clock() * 1000))
        headers = {
            "accessKey": creds.access_key,
            "ts": ts,
            "bizType": BIZ_TYPE,
            "action": ACTION,
            "sign": nx_sign(
                creds.access_key, ACTION, BIZ_TYPE, ts, body, creds.access_secret, self.algorithm
            ),
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        if self.algorithm != "md5":
            headers["algorithm"] = self.algorithm
        return httpx.Request("POST", self._url, headers=headers, content=body)

    def record_query_request(self, message_id: str, date: datetime.date | str) -> httpx.Request:
        """Legacy ``POST /api/sms/get`` for one message (form, ``appkey`` + ``secretkey``).

        ``date`` is the send day (``yyyyMMdd``, NXCloud's day; only the last 31 days).
        Read the answer with :func:`parse_record`.
        """
        secret = self._creds.app_secret
        if not secret:
            raise CredentialsError("environment variable NXCLOUD_APP_SECRET is not set or empty")
        day = date.strftime("%Y%m%d") if isinstance(date, datetime.date) else date
        form = {"appkey": self._creds.app_key, "secretkey": secret, "date": day, "messageid": message_id}
        body = urllib.parse.urlencode(form).encode()
        headers = {"content-type": "application/x-www-form-urlencoded", "accept": "application/json"}
        return httpx.Request("POST", self._record_url, headers=headers, content=body)

    # -- responses --------------------------------------------------------------------------------
    def parse_response(self, batch: Batch, response: Response) -> BatchOutcome:
        status = response.status_code
        data = _loads(response.content)
        code = result_code(data.get("code")) if isinstance(data, dict) else None
        if not isinstance(data, dict) or code is None:
            # No usable code. A 2xx or 5xx reached NXCloud and may have been processed.
            if status == 429:
                kind = Outcome.THROTTLED
            else:
                kind = Outcome.FATAL if status < 200 or 300 <= status < 500 else Outcome.UNKNOWN
            return BatchOutcome(
                kind,
                code=f"HTTP{status}",
                message=(_text(data) if isinstance(data, dict) else None) or "response without a code",
                retry_after=retry_after_seconds(response.headers) if kind is Outcome.THROTTLED else None,
            )
        message = _text(data)
        if code == "0" and not 200 <= status < 300:  # contradicts itself: may have been accepted
            return BatchOutcome(Outcome.UNKNOWN, code=f"HTTP{status}", message=message or code)
        kind = classify(code, status)
        items = data.get("data")
        if code in _PER_ITEM and isinstance(items, list) and items:
            return self._per_item(batch, items, code, message)
        if code == "0":  # processed, but which items were sent is not said
            return BatchOutcome(Outcome.UNKNOWN, code="NoResult", message=message or "code 0 without data")
        retry_after = retry_after_seconds(response.headers) if kind is Outcome.THROTTLED else None
        return BatchOutcome(kind, code=code, message=message, retry_after=retry_after)

    def _per_item(self, batch: Batch, items: list[object], code: str, message: str | None) -> BatchOutcome:
        """Each recipient's item, matched by ``messageid``, else by a number unique in the batch."""
        ids = self._ids(batch.messages, keep=False)
        if _all_sent(items, ids):  # the common answer, without an outcome object per recipient
            return BatchOutcome(Outcome.SENT, code=code, message=message)
        by_id: dict[str, int] = {}
        by_phone: dict[str, int | None] = {}
        for i, (mid, m) in enumerate(zip(ids, batch.messages, strict=True)):
            by_id.setdefault(mid, i)
            by_phone[m.phone] = None if m.phone in by_phone else i  # None: not unique
        found: list[RecipientOutcome | None] = [None] * len(ids)
        conflicting: set[int] = set()
        for item in items:
            if not isinstance(item, dict):
                continue
            item_id, phone = item.get("messageid"), item.get("phone")
            target = by_id.get(item_id) if isinstance(item_id, str) else None
            if target is None and isinstance(phone, str):
                target = by_phone.get(phone)
            if target is None:
                continue  # matches no recipient: nothing can be recorded from it
            outcome = item_outcome(item)
            before = found[target]
            if before is not None and (before.outcome, before.message) != (outcome.outcome, outcome.message):
                conflicting.add(target)
            found[target] = outcome
        recipients = [
            RecipientOutcome(Outcome.UNKNOWN, code="ConflictingResults")
            if i in conflicting
            else r or RecipientOutcome(Outcome.UNKNOWN, code="NoResult")
            for i, r in enumerate(found)
        ]
        if all(
            r.outcome is Outcome.SENT and r.provider_id in (None, i)
            for r, i in zip(recipients, ids, strict=True)
        ):
            # Nothing beyond "all accepted": the ids are ours, recomputable from the keys.
            return BatchOutcome(Outcome.SENT, code=code, message=message)
        return summarize(recipients)


# -- declaration (providers/registry.py) -----------------------------------------------------
def _build(settings: ProviderSettings) -> NxcloudSms:
    base = settings.endpoint.rstrip("/")
    algorithm: Algorithm = settings.options.get("algorithm") or "md5"
    return NxcloudSms(
        credentials=NxcloudCredentials.from_env(settings.environ),
        run_tag=settings.run_id,
        batch_size=settings.batch_size,
        algorithm=algorithm,
        source_address=settings.options.get("source_address"),
        endpoint=base + "/v1/sms/multi/mt",
        record_url=base + "/api/sms/get",
    )


def _check_message(options: Mapping[str, object], message: Mapping[str, object]) -> tuple[str, str] | None:
    return None if message.get("content") else ("message.content", "is required for nxcloud")


def _preflight(provider: Provider) -> None:
    """The record query authenticates with the app's own secret (``NXCLOUD_APP_SECRET``)."""
    assert isinstance(provider, NxcloudSms)
    provider.record_query_request("probe-0000000000", "20260101")


async def _record(provider: Provider, item: UnknownSend, fetch: Fetch) -> RecordResult:
    """The record query for the recipient's ``sysMessageId`` (derived from its key)."""
    assert isinstance(provider, NxcloudSms)
    message = Message(item.row, item.key, item.phone, {}, "")
    request = provider.record_query_request(provider.message_id(message), beijing_date(item.sent_at))
    return parse_record(await fetch(request))


async def _lookup(provider: Provider, item: UnknownSend, fetch: Fetch) -> str:
    found = await _record(provider, item, fetch)
    if found.ok:
        return "sent"
    return "missing" if found.code == "0" else f"error:{found.code}"


async def _delivery(provider: Provider, item: UnknownSend, fetch: Fetch) -> tuple[str, str]:
    """The record's ``dr``: DELIVRD, another final state, or none yet."""
    found = await _record(provider, item, fetch)
    if not found.ok or found.row is None:
        return ("waiting", "") if found.code == "0" else ("error", found.code)
    dr = str(found.row.get("dr") or "")
    if dr == "DELIVRD":
        return "delivered", dr
    return ("undelivered", dr) if dr else ("waiting", "")


SPEC = ProviderKind(
    kind="nxcloud",
    build=_build,
    env=(
        EnvVar("NXCLOUD_ACCESS_KEY"),
        EnvVar("NXCLOUD_ACCESS_SECRET", secret=True),
        EnvVar("NXCLOUD_APP_KEY"),
        EnvVar("NXCLOUD_APP_SECRET", secret=True, required=False),
    ),
    default_endpoint="https://api2.nxcloud.com",
    max_batch=MAX_BATCH,
    config=(
        ConfigKey("algorithm", str, ("md5", "sha256"), "md5"),
        ConfigKey("source_address", str),
    ),
    check_message=_check_message,
    test_env={
        "NXCLOUD_ACCESS_KEY": "fme2na3kdi3ki",
        "NXCLOUD_ACCESS_SECRET": "abciiiko2k3",
        "NXCLOUD_APP_KEY": "yourAppKey",
        "NXCLOUD_APP_SECRET": "yourAppSecret",
    },
    reconcile=ReconcileQuery(lookup=_lookup, delivery=_delivery, preflight=_preflight),
    text_limit=lambda options, message: NxcloudSms.text_limit(),
    message_id=message_id,
    receipts=nxcloud_receipts.PUSH,
)
