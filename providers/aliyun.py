"""Aliyun dysmsapi 2017-05-25 ``SendBatchSms``: requests and outcomes.

Sans-I/O. Facts are from PROTOCOLS.md §1. Parameter placement follows the official Tea
SDK: ``TemplateCode`` and ``OutId`` in the query, the JSON parameters in a form body.
Signing lives in aliyun_sign.py (re-exported here); the simulator's verifiers in
providers/simulator/aliyun_verify.py.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Hashable, Mapping, Sequence
from typing import Literal

import httpx
import orjson

from providers import aliyun_receipts
from providers.aliyun_query import (
    SendRecord,
    beijing_date,
    delivery_of,
    find_record,
    parse_query,
    query_request,
)
from providers.aliyun_sign import (
    API_VERSION,
    DEFAULT_ENDPOINT,
    TEST_CREDENTIALS,
    AliyunCredentials,
    CredentialsError,
    _encode_bytes,
    _encode_pairs,
    _join,
    _once_twice,
    _rpc_hmac,
    _rpc_string_to_sign,
    _twice,
    percent_encode,
    rpc_signature,
    rpc_string_to_sign,
    v3_canonical_request,
    v3_sign_headers,
    v3_signature,
)
from providers.base import (
    Batch,
    BatchOutcome,
    Clock,
    Message,
    NonceSource,
    Outcome,
    Provider,
    Response,
    TextLimit,
    WireRequest,
    fill_template,
    sign_and_params,
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
    "API_VERSION",
    "CODE_CLASSES",
    "DEFAULT_ENDPOINT",
    "SPEC",
    "SPLIT_CODES",
    "TEST_CREDENTIALS",
    "AliyunCredentials",
    "AliyunSms",
    "CredentialsError",
    "aliyun_phone",
    "classify",
    "codeless_outcome",
    "percent_encode",
    "refusal",
    "rpc_signature",
    "rpc_string_to_sign",
    "signature_of",
    "v3_canonical_request",
    "v3_sign_headers",
    "v3_signature",
)

_ACTION = "SendBatchSms"
_STAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_FORM = "application/x-www-form-urlencoded"


# -- outcome classes (PROTOCOLS.md §1.7-1.8) -------------------------------------------------
_CLASSES: dict[Outcome, tuple[str, ...]] = {
    Outcome.SENT: ("OK",),
    # The number or its content is at fault (a recipient alone; a call of several is SPLIT).
    Outcome.FAILED: (
        "isv.MOBILE_NUMBER_ILLEGAL",
        "isv.DOMESTIC_NUMBER_NOT_SUPPORTED",
        "isv.BLACK_KEY_CONTROL_LIMIT",
        "isv.SMS_CONTENT_ILLEGAL",
        "isv.TEMPLATE_PARAMS_ILLEGAL",
        "isv.PARAM_NOT_SUPPORT_URL",
        "isv.PARAM_LENGTH_LIMIT",
    ),
    Outcome.FATAL: (
        # auth (a wrong secret never succeeds on retry, so SignatureDoesNotMatch stops the run)
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "InvalidAccessKeyId.NotFound",
        "Forbidden.RAM",
        "isp.RAM_PERMISSION_DENY",
        "isv.DENY_IP_RANGE",
        # account / balance / volume caps
        "isv.AMOUNT_NOT_ENOUGH",
        "isv.OUT_OF_SERVICE",
        "isv.PRODUCT_UN_SUBSCRIPT",
        "isv.PRODUCT_UNSUBSCRIBE",
        "isv.ACCOUNT_NOT_EXISTS",
        "isv.ACCOUNT_ABNORMAL",
        "isv.DAY_LIMIT_CONTROL",
        "isv.MONTH_LIMIT_CONTROL",
        # template / signature / parameters
        "isv.SMS_TEMPLATE_ILLEGAL",
        "isv.SMS_SIGNATURE_ILLEGAL",
        "isv.SMS_SIGN_ILLEGAL",
        "isv.SIGN_STATE_ILLEGAL",
        "isv.SMS_SIGNATURE_SCENE_ILLEGAL",
        "isv.TEMPLATE_MISSING_PARAMETERS",
        "isv.INVALID_PARAMETERS",
        "isv.INVALID_JSON_PARAM",
        "isv.MOBILE_COUNT_OVER_LIMIT",
        "isv.EXTEND_CODE_ERROR",
        "MissingParameter",
        "InvalidParameter",
    ),
    # Refused before processing: a resend with a fresh timestamp and nonce is safe.
    Outcome.RETRY: ("InvalidTimeStamp.Expired", "SignatureNonceUsed"),
    Outcome.THROTTLED: ("Throttling.User", "Throttling.Api", "Throttling"),
    # Per-number frequency control: the number stays blocked until its window passes
    # (a recipient alone; a call of several is SPLIT).
    Outcome.DEFER: ("isv.BUSINESS_LIMIT_CONTROL",),
    # The messages may already have been accepted.
    Outcome.UNKNOWN: ("isp.SYSTEM_ERROR", "isp.UNKNOWN_ERROR", "InternalError", "ServiceUnavailable"),
}
CODE_CLASSES: Mapping[str, Outcome] = {code: kind for kind, codes in _CLASSES.items() for code in codes}

SPLIT_CODES = frozenset((*_CLASSES[Outcome.FAILED], *_CLASSES[Outcome.DEFER]))
"""Codes that refuse a whole call because of some of its recipients (PROTOCOLS.md §1.8).

A refused call has no ``BizId``: nothing of it was sent, and one code cannot say which
recipient it was about. A call of several recipients is therefore SPLIT (the engine sends its
parts until the recipients at fault stand alone); a recipient alone gets the code's class.
``isv.BUSINESS_LIMIT_CONTROL`` (a number over its minute/hour/day frequency window) is split
too rather than deferred whole: deferring would hold back every good recipient of the batch,
and a resume would batch them again with the same blocked number; alone, that number is
deferred (not failed: the window passes)."""


def refusal(code: str, message: str | None, recipients: int, extra: dict[str, object]) -> BatchOutcome | None:
    """The SPLIT outcome of a call of ``recipients`` refused with ``code``, or None when the
    code is not about recipients (or the call held one: its class is then the answer)."""
    if code not in SPLIT_CODES or recipients < 2:
        return None
    return BatchOutcome(
        Outcome.SPLIT, code=code, message=message, extra={**extra, "alone": CODE_CLASSES[code]}
    )


def classify(code: str, http_status: int) -> Outcome:
    """The outcome class of an Aliyun ``Code`` received with ``http_status``.

    Unrecognised codes: on a 5xx the request may have been processed (UNKNOWN); 429 or a
    ``Throttling.*`` variant is a throttle; anything else, including an unrecognised
    ``isv.*`` code on a 200, is taken as a whole-request refusal (FATAL). FATAL stops the
    run with the code shown and leaves the recipients pending, which a resume recovers;
    marking a batch FAILED on a code we do not understand could not be undone.
    """
    known = CODE_CLASSES.get(code)
    if known is not None:
        return known
    if http_status >= 500:
        return Outcome.UNKNOWN
    if http_status == 429 or code.startswith("Throttling."):
        return Outcome.THROTTLED
    return Outcome.FATAL


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait: ``x-acs-retry-after`` (milliseconds, as the official Tea SDKs and
    the simulator use it) or ``Retry-After`` (seconds). Unusable values give None."""
    raw, scale = headers.get("x-acs-retry-after"), 0.001
    if raw is None:
        raw, scale = headers.get("retry-after"), 1.0
    if raw is None:
        return None
    try:
        seconds = float(raw.strip()) * scale
    except ValueError:  # e.g. an HTTP-date Retry-After
        return None
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return min(seconds, 3600.0)


# -- the provider ---------------------------------------------------------------------------
def codeless_outcome(response: Response, message: str | None, extra: dict[str, object]) -> BatchOutcome:
    """A response with no usable ``Code``: a 2xx or 5xx reached the provider and may have
    been processed (unknown); another 4xx refused the whole request; 429 is a throttle."""
    status = response.status_code
    if status == 429:
        kind = Outcome.THROTTLED
    else:
        kind = Outcome.FATAL if 400 <= status < 500 else Outcome.UNKNOWN
    return BatchOutcome(
        kind,
        code=f"HTTP{status}",
        message=message or "response without an Aliyun Code",
        retry_after=_retry_after(response.headers) if kind is Outcome.THROTTLED else None,
        extra=extra,
    )


def aliyun_phone(phone: str) -> str:
    """E.164 digits → Aliyun's form: bare 11 digits for mainland mobiles, else CC + number."""
    return phone[2:] if len(phone) == 13 and phone[:3] == "861" else phone


class AliyunSms:
    """``SendBatchSms``: one template per campaign, up to 100 numbers, a sign name per number."""

    name = "aliyun"
    max_batch_size = 100
    max_text_length = 500  # signature + template text (PROTOCOLS.md §1.6)

    @staticmethod
    def text_limit(template_text: str | None = None) -> TextLimit:
        """Aliyun renders the approved template: with its text (``${name}`` placeholders) the
        whole ``【sign】`` + text is counted; without it only the signature and parameter values,
        a lower bound (every parameter appears in the template at least once)."""
        n = AliyunSms.max_text_length
        if template_text is None:
            return TextLimit("aliyun", n, sign_and_params, whole=False)
        return TextLimit("aliyun", n, lambda m: f"【{m.sign_name}】" + fill_template(template_text, m.params))

    def __init__(
        self,
        *,
        credentials: AliyunCredentials,
        template_code: str,
        endpoint: str = DEFAULT_ENDPOINT,
        signature: Literal["v3", "v2"] = "v3",
        clock: Clock = time.time,
        nonce: NonceSource = lambda: uuid.uuid4().hex,
        region_id: str | None = None,
    ) -> None:
        if signature not in ("v3", "v2"):
            raise ValueError(f"signature must be 'v3' or 'v2', not {signature!r}")
        url = httpx.URL(endpoint)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"endpoint must be an http(s) URL, not {endpoint!r}")
        host = url.netloc.decode("ascii")  # includes a non-default port, as httpx sends it
        self.template_code = template_code
        self._creds = credentials
        self._v3 = signature == "v3"
        self._clock = clock
        self._nonce = nonce
        self._origin = f"{url.scheme}://{host}"  # RPC: the path is always "/"
        self._stamp: tuple[int, str] = (-1, "")
        self._signs: dict[str, tuple[str, str]] = {}  # sign name → its JSON string, encoded once and twice
        self._v3_headers = {
            "host": host,
            "content-type": _FORM,
            "accept": "application/json",
            "x-acs-action": _ACTION,
            "x-acs-version": API_VERSION,
        }
        self._v2_headers = {"host": host, "content-type": _FORM, "accept": "application/json"}
        common = {
            "Action": _ACTION,
            "Version": API_VERSION,
            "Format": "JSON",
            "AccessKeyId": credentials.access_key_id,
            "SignatureMethod": "HMAC-SHA1",
            "SignatureVersion": "1.0",
            "TemplateCode": template_code,
        }
        if region_id:
            common["RegionId"] = region_id
        self._v2_common = [_twice(k, v) for k, v in common.items()]

    def details_request(self, phone: str, send_date: str, page: int = 1) -> httpx.Request:
        """``QuerySendDetails`` for one number and day, signed with these credentials (reconciliation)."""
        return query_request(
            self._creds, phone, send_date, page=page, endpoint=self._origin, clock=self._clock
        )

    def batch_key(self, message: Message) -> Hashable:
        return _ACTION  # the template is campaign-wide and sign names go per number

    def _timestamp(self) -> str:
        second = int(self._clock())
        cached = self._stamp
        if cached[0] != second:
            cached = self._stamp = (second, time.strftime(_STAMP_FORMAT, time.gmtime(second)))
        return cached[1]

    def _sign_name(self, name: str) -> tuple[str, str]:
        if len(self._signs) >= 4096:
            self._signs.clear()
        encoded = self._signs[name] = _once_twice(orjson.dumps(name).decode())
        return encoded

    def _form(self, messages: Sequence[Message], twice: bool) -> list[tuple[str, str, str]]:
        """The body parameters as ``_twice`` triples (encoded twice only if ``twice``, else "")."""
        # aliyun_phone, inlined: it runs for every recipient
        phones = [p[2:] if len(p) == 13 and p[:3] == "861" else p for p in [m.phone for m in messages]]
        digits = "".join(phones)
        if digits.isascii() and digits.isalnum():  # the usual case: nothing in the numbers to escape
            phone_json = (
                f"%5B%22{'%22%2C%22'.join(phones)}%22%5D",
                f"%255B%2522{'%2522%252C%2522'.join(phones)}%2522%255D" if twice else "",
            )
        else:
            phone_json = _once_twice(orjson.dumps(phones).decode())
        # Sign names repeat from batch to batch: each is encoded once, then joined.
        signs = self._signs
        sign_names = [m.sign_name for m in messages]
        if sign_names and sign_names.count(sign_names[0]) == len(sign_names):  # one sign name: usual
            first = signs.get(sign_names[0]) or self._sign_name(sign_names[0])
            names = [first] * len(sign_names)
        else:
            names = [signs.get(n) or self._sign_name(n) for n in sign_names]
        form = [
            ("PhoneNumberJson", *phone_json),
            (
                "SignNameJson",
                f"%5B{'%2C'.join([n[0] for n in names])}%5D",
                f"%255B{'%252C'.join([n[1] for n in names])}%255D" if twice else "",
            ),
        ]
        if any(m.params for m in messages):
            params = _encode_bytes(orjson.dumps([m.params for m in messages]))
            form.append(("TemplateParamJson", params, params.replace("%", "%25") if twice else ""))
        return form

    def build_request(self, batch: Batch) -> httpx.Request:
        return self.build_wire(batch).to_httpx()

    def build_wire(self, batch: Batch) -> WireRequest:
        form = self._form(batch.messages, twice=not self._v3)
        body = _join(form).encode("ascii")
        stamp, nonce = self._timestamp(), self._nonce()
        if self._v3:
            query = [("OutId", batch.out_id)] if batch.out_id else []
            query.append(("TemplateCode", self.template_code))
            headers = dict(self._v3_headers)
            headers["x-acs-date"] = stamp
            headers["x-acs-signature-nonce"] = nonce
            headers = v3_sign_headers("POST", "/", query, headers, body, self._creds)
            target = _join(_encode_pairs(query))
        else:
            params = [*self._v2_common, _twice("SignatureNonce", nonce), _twice("Timestamp", stamp)]
            if batch.out_id:
                params.append(_twice("OutId", batch.out_id))
            target = _join(params)  # before sorting: query order does not matter, but keep it stable
            to_sign = _rpc_string_to_sign("POST", params + form)
            signature = _rpc_hmac(to_sign, self._creds.access_key_secret)
            target += f"&Signature={percent_encode(signature)}"
            headers = self._v2_headers
        # The query is already encoded and is sent byte for byte: what is sent is what was signed.
        return WireRequest("POST", f"{self._origin}/?{target}", list(headers.items()), body)

    def parse_response(self, batch: Batch, response: Response) -> BatchOutcome:
        status = response.status_code
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            data = {}
        request_id = data.get("RequestId") or response.headers.get("x-acs-request-id")
        extra: dict[str, object] = {"request_id": request_id} if isinstance(request_id, str) else {}
        code = data.get("Code")
        message = data.get("Message")
        message = message[:500] if isinstance(message, str) and message else None
        if not isinstance(code, str) or not code:
            return codeless_outcome(response, message, extra)
        if code == "OK":
            if 200 <= status < 300:
                biz_id = data.get("BizId")
                return BatchOutcome(
                    Outcome.SENT,
                    code=code,
                    provider_id=biz_id if isinstance(biz_id, str) else None,
                    extra=extra,
                )
            # "OK" with an error status contradicts itself: it may have been accepted.
            return BatchOutcome(Outcome.UNKNOWN, code=f"HTTP{status}", message=code, extra=extra)
        split = refusal(code, message, len(batch.messages), extra)
        if split is not None:
            return split
        kind = classify(code, status)
        return BatchOutcome(
            kind,
            code=code,
            message=message,
            retry_after=_retry_after(response.headers),
            extra=extra,
        )


# -- declaration (providers/registry.py) -----------------------------------------------------
ALIYUN_ENV = (EnvVar("ALIYUN_ACCESS_KEY_ID"), EnvVar("ALIYUN_ACCESS_KEY_SECRET", secret=True))
ALIYUN_TEST_ENV = {
    "ALIYUN_ACCESS_KEY_ID": TEST_CREDENTIALS.access_key_id,
    "ALIYUN_ACCESS_KEY_SECRET": TEST_CREDENTIALS.access_key_secret,
}
ALIYUN_CONFIG = (
    ConfigKey("signature", str, ("v3", "v2"), "v3"),
    ConfigKey("region_id", str),
)


def signature_of(options: Mapping[str, object]) -> Literal["v3", "v2"]:
    return "v2" if options.get("signature") == "v2" else "v3"


def _build(settings: ProviderSettings) -> AliyunSms:
    return AliyunSms(
        credentials=AliyunCredentials.from_env(settings.environ),
        template_code=settings.message["template_code"],
        endpoint=settings.endpoint,
        signature=signature_of(settings.options),
        region_id=settings.options.get("region_id"),
    )


def _check_message(options: Mapping[str, object], message: Mapping[str, object]) -> tuple[str, str] | None:
    if not str(message.get("template_code") or "").strip():
        return "message.template_code", "is required for aliyun"
    return None


async def _record(provider: Provider, item: UnknownSend, fetch: Fetch) -> SendRecord | str:
    """``QuerySendDetails`` by number and Beijing day, matched on the batch's ``OutId``."""
    assert isinstance(provider, AliyunSms)
    phone, day = aliyun_phone(item.phone), beijing_date(item.sent_at)

    async def page(n: int) -> tuple[str, int, list[SendRecord]]:
        return parse_query(await fetch(provider.details_request(phone, day, n)))

    return await find_record(page, item.out_id)


async def _lookup(provider: Provider, item: UnknownSend, fetch: Fetch) -> str:
    rec = await _record(provider, item, fetch)
    if isinstance(rec, str):
        return rec
    return f"failed:{rec.err_code or 'SendStatus2'}" if rec.send_status == 2 else "sent"


async def _delivery(provider: Provider, item: UnknownSend, fetch: Fetch) -> tuple[str, str]:
    """``SendStatus``: 1 waiting for the receipt, 2 failed, 3 delivered."""
    return delivery_of(await _record(provider, item, fetch), failed=(2,))


SPEC = ProviderKind(
    kind="aliyun",
    build=_build,
    env=ALIYUN_ENV,
    default_endpoint=DEFAULT_ENDPOINT,
    max_batch=AliyunSms.max_batch_size,
    config=ALIYUN_CONFIG,
    check_message=_check_message,
    test_env=ALIYUN_TEST_ENV,
    reconcile=ReconcileQuery(lookup=_lookup, delivery=_delivery),
    text_limit=lambda options, message: AliyunSms.text_limit(message.get("template_text")),
    receipts=aliyun_receipts.PUSH,
)
