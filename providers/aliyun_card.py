"""Aliyun dysmsapi 2017-05-25 ``SendBatchCardSms`` (card SMS with a fallback) and ``GetCardSmsDetails``.

Sans-I/O; facts from PROTOCOLS.md §1.2, §1.7-1.9. Signing, codes and phone formatting are
those of :mod:`providers.aliyun`. As the official Tea SDK does, every business parameter goes in
the query and the body is empty (see ``captures/tea_v*_SendBatchCardSms.json``).

**Template parameters** (``Message.params``) are routed by key prefix, each channel's objects
index-aligned with ``PhoneNumberJson``:

=============  =============================  =============================================
key            goes to                        when
=============  =============================  =============================================
``card.x``     ``CardTemplateParamJson``      always (e.g. ``card.customUrl``, ``card.dyncParams``)
``sms.x``      ``SmsTemplateParamJson``       ``fallback_type="SMS"``
``digital.x``  ``DigitalTemplateParamJson``   ``fallback_type="DIGITALSMS"``
``text.x``     ``TemplateParamJson``          ``template_code`` is set
``x``          every text template in use     (SMS or digital fallback, and ``template_code``)
=============  =============================  =============================================

Unprefixed keys are shared so that the parameters of a plain ``SendBatchSms`` campaign work
unchanged for the fallback text; a prefixed key overrides a shared one of the same name for its
channel. A ``*ParamJson`` is sent only when some recipient has a parameter for it. Keys for a
channel not in use are dropped; :meth:`AliyunCardSms.check_params` reports them up front.

**Outcomes.** Each recipient gets its own :class:`RecipientOutcome`. A SENT recipient's
``provider_id`` is ``"<channel>:<id>"``: ``card:<BizCardId>`` for a number in ``MediaMobiles``;
for ``NotMediaMobiles``, ``sms:<BizSmsId>`` (fallback SMS) or ``digital:<BizDigitalId>``
(fallback DIGITALSMS). With ``fallback_type="NONE"`` those numbers got nothing: FAILED,
code ``CardNotSupported``. A number in neither list is UNKNOWN (code ``NotListed``). When the
card template is under review or rejected (``CardTmpState`` 0 or 2) and nothing was sent, the
batch is FATAL with code ``CardTemplateUnderReview`` / ``CardTemplateRejected`` (the recipients
stay pending for a resume).
A call refused whole with a per-recipient code (``providers.aliyun.SPLIT_CODES``) is SPLIT
when it holds several numbers: the engine sends its parts until the numbers at fault stand alone.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import httpx
import orjson

from providers import aliyun_receipts
from providers.aliyun import (
    ALIYUN_CONFIG,
    ALIYUN_ENV,
    ALIYUN_TEST_ENV,
    API_VERSION,
    DEFAULT_ENDPOINT,
    AliyunCredentials,
    AliyunSms,
    _retry_after,
    aliyun_phone,
    classify,
    codeless_outcome,
    percent_encode,
    refusal,
    rpc_signature,
    signature_of,
    v3_sign_headers,
)
from providers.aliyun_query import beijing_date, delivery_of, find_record
from providers.base import (
    Batch,
    BatchOutcome,
    Clock,
    Message,
    NonceSource,
    Outcome,
    Provider,
    RecipientOutcome,
    Response,
    TextLimit,
    WireRequest,
    fill_template,
    summarize,
)
from providers.spec import Fetch, ProviderKind, ProviderSettings, ReconcileQuery, UnknownSend

__all__ = (
    "CHANNELS",
    "SPEC",
    "TEMPLATE_STATES",
    "AliyunCardSms",
    "CardSendRecord",
    "FallbackType",
    "parse_card_details",
)

FallbackType = Literal["SMS", "DIGITALSMS", "NONE"]
CHANNELS: Final = ("card", "sms", "digital", "text")
"""The ``Message.params`` key prefixes (``card.customUrl``...)."""
TEMPLATE_STATES: Final = {0: "CardTemplateUnderReview", 1: "CardTemplateApproved", 2: "CardTemplateRejected"}
"""``CardTmpState`` → a readable code."""

_ACTION = "SendBatchCardSms"
_DETAILS_ACTION = "GetCardSmsDetails"
_FALLBACK_CHANNEL: dict[str, str | None] = {"SMS": "sms", "DIGITALSMS": "digital", "NONE": None}
_PARAM_JSON = {
    "card": "CardTemplateParamJson",
    "sms": "SmsTemplateParamJson",
    "digital": "DigitalTemplateParamJson",
    "text": "TemplateParamJson",
}
_BIZ_ID = {"card": "BizCardId", "sms": "BizSmsId", "digital": "BizDigitalId"}


def _route(key: str) -> tuple[str | None, str]:
    """``card.x`` → ("card", "x"); an unprefixed (shared text) key → (None, key)."""
    head, dot, name = key.partition(".")
    return (head, name) if dot and name and head in _PARAM_JSON else (None, key)


def _phone_key(value: object) -> str:
    """A number as matched against the response lists: ``+86``, ``0086`` and ``86`` dropped."""
    p = str(value).strip().removeprefix("+").removeprefix("00")
    return p[2:] if len(p) == 13 and p[:3] == "861" else p


def _mobiles(value: object) -> set[str]:
    """``MediaMobiles``/``NotMediaMobiles``: a comma-separated string, a JSON array string or a list."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = orjson.loads(text)
            except orjson.JSONDecodeError:
                value = text.strip("[]").replace('"', "").split(",")
        else:
            value = text.split(",")
    if not isinstance(value, list):
        return set()
    keys = {_phone_key(v) for v in value if isinstance(v, str | int) and not isinstance(v, bool)}
    keys.discard("")
    return keys


def _int(value: object) -> int | None:
    """An int sent as a number or as digits (``CardTmpState``, ``SendStatus``), else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


class AliyunCardSms:
    """``SendBatchCardSms``: a card template with a per-campaign fallback, up to 100 numbers.

    ``recommended_timeout`` is Aliyun's guidance for card SMS (≥ 3 s, PROTOCOLS.md §1.6).
    """

    name = "aliyun-card"
    max_batch_size = 100
    recommended_timeout = 3.0

    @staticmethod
    def text_limit(fallback_type: str, template_text: str | None) -> TextLimit | None:
        """The fallback SMS is Aliyun's text SMS (500 with the signature) and is checked when
        its text is known (``template_text``); the card itself has no documented text limit."""
        if fallback_type != "SMS" or template_text is None:
            return None

        def text(m: Message) -> str:
            shared = {k: v for k, v in m.params.items() if "." not in k}
            own = {k[4:]: v for k, v in m.params.items() if k.startswith("sms.")}
            return f"【{m.sign_name}】" + fill_template(template_text, {**shared, **own})

        return TextLimit("aliyun-card", AliyunSms.max_text_length, text)

    def __init__(
        self,
        *,
        credentials: AliyunCredentials,
        card_template_code: str,
        fallback_type: FallbackType,
        sms_template_code: str | None = None,
        digital_template_code: str | None = None,
        template_code: str | None = None,
        endpoint: str = DEFAULT_ENDPOINT,
        signature: Literal["v3", "v2"] = "v3",
        clock: Clock = time.time,
        nonce: NonceSource = lambda: uuid.uuid4().hex,
        region_id: str | None = None,
    ) -> None:
        if not card_template_code:
            raise ValueError("card_template_code is required")
        if fallback_type not in _FALLBACK_CHANNEL:
            raise ValueError(f"fallback_type must be 'SMS', 'DIGITALSMS' or 'NONE', not {fallback_type!r}")
        for field_name, value, needed_with in (
            ("sms_template_code", sms_template_code, "SMS"),
            ("digital_template_code", digital_template_code, "DIGITALSMS"),
        ):
            if fallback_type == needed_with and not value:
                raise ValueError(f"{field_name} is required with fallback_type={needed_with!r}")
            if fallback_type != needed_with and value:
                raise ValueError(f"{field_name} is only used with fallback_type={needed_with!r}")
        if signature not in ("v3", "v2"):
            raise ValueError(f"signature must be 'v3' or 'v2', not {signature!r}")
        url = httpx.URL(endpoint)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"endpoint must be an http(s) URL, not {endpoint!r}")
        self.card_template_code = card_template_code
        self.fallback_type: FallbackType = fallback_type
        self.sms_template_code = sms_template_code or None
        self.digital_template_code = digital_template_code or None
        self.template_code = template_code or None
        self._fallback = _FALLBACK_CHANNEL[fallback_type]
        self._text_channels = [c for c in (self._fallback, "text" if self.template_code else None) if c]
        self._creds = credentials
        self._v3 = signature == "v3"
        self._clock = clock
        self._nonce = nonce
        self._region_id = region_id or None
        self._host = url.netloc.decode("ascii")  # includes a non-default port, as httpx sends it
        self._origin = f"{url.scheme}://{self._host}"
        templates = [("CardTemplateCode", card_template_code), ("FallbackType", fallback_type)]
        for name, code in (
            ("SmsTemplateCode", self.sms_template_code),
            ("DigitalTemplateCode", self.digital_template_code),
            ("TemplateCode", self.template_code),
        ):
            if code:
                templates.append((name, code))
        self._templates = templates

    # -- parameters ---------------------------------------------------------------------
    def check_params(self, keys: Iterable[str]) -> None:
        """Raise ValueError naming the ``Message.params`` keys that no channel in use would carry."""
        carried = {None, "card", *self._text_channels} if self._text_channels else {"card"}
        unused = [k for k in keys if _route(k)[0] not in carried]
        if unused:
            raise ValueError(
                f"params {', '.join(map(repr, unused))} reach no template: fallback_type="
                f"{self.fallback_type!r}, template_code {'set' if self.template_code else 'not set'}"
            )

    def _param_objects(self, messages: Sequence[Message]) -> list[tuple[str, str]]:
        """The ``*TemplateParamJson`` parameters, one object per message in each."""
        per: dict[str, list[dict[str, str]]] = {c: [] for c in ("card", *self._text_channels)}
        for m in messages:
            shared: dict[str, str] = {}
            own: dict[str, dict[str, str]] = {c: {} for c in per}
            for key, value in m.params.items():
                channel, name = _route(key)
                if channel is None:
                    shared[name] = value
                elif channel in own:
                    own[channel][name] = value
            for channel, objects in per.items():
                objects.append(own[channel] if channel == "card" else {**shared, **own[channel]})
        return [
            (_PARAM_JSON[c], orjson.dumps(objects).decode()) for c, objects in per.items() if any(objects)
        ]

    # -- requests -------------------------------------------------------------------------
    def batch_key(self, message: Message) -> Hashable:
        return _ACTION  # templates are campaign-wide and sign names go per number

    def build_wire(self, batch: Batch) -> WireRequest:
        return WireRequest.from_httpx(self.build_request(batch))

    def build_request(self, batch: Batch) -> httpx.Request:
        msgs = batch.messages
        params = [
            *self._templates,
            ("PhoneNumberJson", orjson.dumps([aliyun_phone(m.phone) for m in msgs]).decode()),
            ("SignNameJson", orjson.dumps([m.sign_name for m in msgs]).decode()),
            *self._param_objects(msgs),
        ]
        if batch.out_id:
            params.append(("OutId", batch.out_id))
        return self._signed(_ACTION, params)

    def card_details_request(
        self,
        phone: str,
        send_date: str,
        biz_card_id: str | None = None,
        biz_sms_id: str | None = None,
        biz_digit_id: str | None = None,
        page: int = 1,
        page_size: int = 50,
    ) -> httpx.Request:
        """A signed ``GetCardSmsDetails`` request for one number (E.164 digits) on ``send_date``.

        ``send_date`` is ``yyyyMMdd`` (China time, last 30 days). The ids narrow the lookup to a
        send; note the digital one is sent as ``BizDigitId`` (the send answer says ``BizDigitalId``).
        """
        if not (len(send_date) == 8 and send_date.isascii() and send_date.isdigit()):
            raise ValueError(f"send_date must be yyyyMMdd, not {send_date!r}")
        if page < 1:
            raise ValueError(f"page must be >= 1, not {page}")
        if not 1 <= page_size <= 50:
            raise ValueError(f"page_size must be between 1 and 50, not {page_size}")
        params = [
            ("PhoneNumber", aliyun_phone(phone)),
            ("SendDate", send_date),
            ("PageSize", str(page_size)),
            ("CurrentPage", str(page)),
        ]
        ids = (("BizCardId", biz_card_id), ("BizSmsId", biz_sms_id), ("BizDigitId", biz_digit_id))
        params += [(name, value) for name, value in ids if value]
        return self._signed(_DETAILS_ACTION, params)

    def _signed(self, action: str, params: list[tuple[str, str]]) -> httpx.Request:
        """A POST with every parameter in the query and an empty body, signed V3 or V2."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(self._clock())))
        nonce = self._nonce()
        if self._v3:
            headers = {
                "host": self._host,
                "accept": "application/json",
                "x-acs-action": action,
                "x-acs-version": API_VERSION,
                "x-acs-date": stamp,
                "x-acs-signature-nonce": nonce,
            }
            headers = v3_sign_headers("POST", "/", params, headers, b"", self._creds)
        else:
            common = [
                ("Action", action),
                ("Version", API_VERSION),
                ("Format", "JSON"),
                ("AccessKeyId", self._creds.access_key_id),
                ("SignatureMethod", "HMAC-SHA1"),
                ("SignatureVersion", "1.0"),
                ("SignatureNonce", nonce),
                ("Timestamp", stamp),
            ]
            if self._region_id:
                common.append(("RegionId", self._region_id))
            params = common + params
            params.append(("Signature", rpc_signature("POST", dict(params), self._creds.access_key_secret)))
            headers = {"host": self._host, "accept": "application/json"}
        # Encoded here: httpx keeps the query byte for byte, so what is sent is what was signed.
        query = "&".join([f"{percent_encode(k)}={percent_encode(v)}" for k, v in params])
        return httpx.Request("POST", httpx.URL(f"{self._origin}/?{query}"), headers=headers)

    # -- responses ------------------------------------------------------------------------
    def parse_response(self, batch: Batch, response: Response) -> BatchOutcome:
        status = response.status_code
        data = _json_object(response)
        request_id = data.get("RequestId") or response.headers.get("x-acs-request-id")
        extra: dict[str, object] = {"request_id": request_id} if isinstance(request_id, str) else {}
        body = data.get("Data")
        body = body if isinstance(body, dict) else {}
        state = _int(body.get("CardTmpState"))
        if state is not None:
            extra["card_tmp_state"] = state
        code = data.get("Code")
        message = data.get("Message")
        message = message[:500] if isinstance(message, str) and message else None
        if not isinstance(code, str) or not code:
            return codeless_outcome(response, message, extra)
        if code != "OK":
            kind = classify(code, status)
            if state in (0, 2) and kind is not Outcome.UNKNOWN:
                return self._template_refused(state, extra, f"{code}: {message or ''}".rstrip(": "))
            split = refusal(code, message, len(batch.messages), extra)
            if split is not None:
                return split
            return BatchOutcome(
                kind, code=code, message=message, retry_after=_retry_after(response.headers), extra=extra
            )
        if not 200 <= status < 300 or data.get("Success") is False:
            # "OK" with an error status or Success=false contradicts itself: it may have been accepted.
            odd = f"HTTP{status}" if not 200 <= status < 300 else "SuccessFalse"
            return BatchOutcome(Outcome.UNKNOWN, code=odd, message="OK contradicted", extra=extra)
        if not body:
            return BatchOutcome(Outcome.UNKNOWN, code="NoData", message="OK without Data", extra=extra)
        recipients = self._recipients(batch.messages, body)
        if state in (0, 2) and all(r.outcome is not Outcome.SENT for r in recipients):
            return self._template_refused(state, extra, message)
        card_id = _text(body.get("BizCardId"))
        return summarize(recipients, provider_id=card_id or None, extra=extra)

    def _recipients(self, messages: Sequence[Message], data: dict[str, Any]) -> list[RecipientOutcome]:
        card = _mobiles(data.get("MediaMobiles"))
        fell_back = _mobiles(data.get("NotMediaMobiles"))
        card_sent = RecipientOutcome(Outcome.SENT, provider_id=f"card:{_text(data.get('BizCardId'))}")
        if self._fallback is None:
            fallback = RecipientOutcome(Outcome.FAILED, code="CardNotSupported")
        else:
            biz_id = _text(data.get(_BIZ_ID[self._fallback]))
            fallback = RecipientOutcome(Outcome.SENT, provider_id=f"{self._fallback}:{biz_id}")
        out = []
        for m in messages:
            key = _phone_key(aliyun_phone(m.phone))
            if key in card:
                out.append(card_sent)
            elif key in fell_back:
                out.append(fallback)
            else:
                out.append(RecipientOutcome(Outcome.UNKNOWN, code="NotListed"))
        return out

    def _template_refused(self, state: int, extra: dict[str, object], detail: str | None) -> BatchOutcome:
        what = "under review" if state == 0 else "rejected"
        return BatchOutcome(
            Outcome.FATAL,
            code=TEMPLATE_STATES[state],
            message=f"card template {self.card_template_code} is {what}; nothing was sent"
            + (f" ({detail})" if detail else ""),
            extra=extra,
        )


def _json_object(response: Response) -> dict[str, Any]:
    try:
        data = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


# -- GetCardSmsDetails ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CardSendRecord:
    """One ``CardSendDetailDTO.Records`` entry.

    ``send_status``: 1 sending, 2 failed, 3 success, 4 addressing failed (0 when absent).
    """

    out_id: str
    send_status: int
    err_code: str


def parse_card_details(response: httpx.Response) -> tuple[str, int, list[CardSendRecord]]:
    """(code, total count, records) of a ``GetCardSmsDetails`` answer; never raises on a bad body."""
    data = _json_object(response)
    code = data.get("Code")
    if not isinstance(code, str) or not code:
        return f"HTTP{response.status_code}", 0, []
    dto = data.get("CardSendDetailDTO")
    dto = dto if isinstance(dto, dict) else {}
    raw = dto.get("Records")
    if isinstance(raw, dict):  # an XML-style wrapper: {"Records": {"Record": [...]}}
        raw = next((v for v in raw.values() if isinstance(v, list)), [])
    records = [
        CardSendRecord(_text(r.get("OutId")), _int(r.get("SendStatus")) or 0, _text(r.get("ErrCode")))
        for r in (raw if isinstance(raw, list) else [])
        if isinstance(r, dict)
    ]
    total = _int(dto.get("TotalCount"))
    return code, len(records) if total is None else total, records


# -- declaration (providers/registry.py) -----------------------------------------------------
def _build(settings: ProviderSettings) -> AliyunCardSms:
    message = settings.message
    fallback: FallbackType = message.get("fallback_type") or "SMS"
    card = AliyunCardSms(
        credentials=AliyunCredentials.from_env(settings.environ),
        card_template_code=message.get("card_template_code") or "",
        fallback_type=fallback,
        sms_template_code=message.get("template_code") if fallback == "SMS" else None,
        digital_template_code=message.get("digital_template_code") if fallback == "DIGITALSMS" else None,
        endpoint=settings.endpoint,
        signature=signature_of(settings.options),
        region_id=settings.options.get("region_id"),
    )
    card.check_params(message.get("params") or {})
    return card


def _check_message(options: Mapping[str, object], message: Mapping[str, object]) -> tuple[str, str] | None:
    if not message.get("card_template_code"):
        return "message.card_template_code", "is required for aliyun-card"
    fallback = message.get("fallback_type", "SMS")
    if fallback not in ("SMS", "DIGITALSMS", "NONE"):
        return "message.fallback_type", "must be SMS, DIGITALSMS or NONE"
    if fallback == "SMS" and not message.get("template_code"):
        return "message.template_code", "is required: the text template of the SMS fallback"
    if fallback == "DIGITALSMS" and not message.get("digital_template_code"):
        return "message.digital_template_code", "is required with DIGITALSMS fallback"
    return None


async def _record(provider: Provider, item: UnknownSend, fetch: Fetch) -> CardSendRecord | str:
    """GetCardSmsDetails by number and day, matched on the batch's OutId."""
    assert isinstance(provider, AliyunCardSms)
    phone, day = aliyun_phone(item.phone), beijing_date(item.sent_at)

    async def page(n: int) -> tuple[str, int, list[CardSendRecord]]:
        return parse_card_details(await fetch(provider.card_details_request(phone, day, page=n)))

    return await find_record(page, item.out_id)


async def _lookup(provider: Provider, item: UnknownSend, fetch: Fetch) -> str:
    """2 and 4 (addressing failed) are failures."""
    rec = await _record(provider, item, fetch)
    if isinstance(rec, str):
        return rec
    return f"failed:{rec.err_code or 'SendStatus'}" if rec.send_status in (2, 4) else "sent"


async def _delivery(provider: Provider, item: UnknownSend, fetch: Fetch) -> tuple[str, str]:
    return delivery_of(await _record(provider, item, fetch), failed=(2, 4))


SPEC = ProviderKind(
    kind="aliyun-card",
    build=_build,
    env=ALIYUN_ENV,
    default_endpoint=DEFAULT_ENDPOINT,
    max_batch=AliyunCardSms.max_batch_size,
    config=ALIYUN_CONFIG,
    check_message=_check_message,
    test_env=ALIYUN_TEST_ENV,
    reconcile=ReconcileQuery(lookup=_lookup, delivery=_delivery),
    text_limit=lambda options, message: AliyunCardSms.text_limit(
        message.get("fallback_type") or "", message.get("template_text")
    ),
    receipts=aliyun_receipts.PUSH,
)
