"""The simulated Aliyun dysmsapi gateway: SendBatchSms, SendBatchCardSms, QuerySendDetails, GetCardSmsDetails.

Facts from PROTOCOLS.md §1. Parameters come from the query and, for
``application/x-www-form-urlencoded`` bodies, the form. Order of checks:
access key, per-key rate window, injected pre-processing faults, signature
(V3 ``ACS3-HMAC-SHA256`` or RPC V2), version, timestamp, nonce, then the
action's own parameters. Gateway errors use ``{"RequestId","HostId","Code",
"Message","Recommend"}`` with an HTTP error status; business errors use
``{"Code","Message","RequestId"}`` with HTTP 200. With ``bad_number_rate``, a send
holding a number ``config.is_bad_number`` picks is refused whole with
``isv.MOBILE_NUMBER_ILLEGAL`` (both APIs; which number is not said), nothing recorded.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import orjson

from providers.simulator.aliyun_verify import parse_v3_authorization, verify_v2, verify_v3
from providers.simulator.config import SimulatorConfig
from providers.simulator.core import (
    PRE_FAULTS,
    FaultPlan,
    FixedWindowLimiter,
    IdSource,
    NonceCache,
    ReceiptLog,
    Sent,
    Stats,
)
from providers.simulator.push import undelivered
from providers.simulator.server import Connection, Request, parse_urlencoded

__all__ = ("API_VERSION", "MAX_NUMBERS", "SEND_ACTIONS", "AliyunGateway", "phone_key")

API_VERSION = "2017-05-25"
MAX_NUMBERS = 100
SEND_ACTIONS = frozenset({"SendBatchSms", "SendBatchCardSms"})
HOST_ID = "dysmsapi.aliyuncs.com"
V3_WINDOW = 15 * 60.0
V2_WINDOW = 31 * 60.0
_BEIJING = 8 * 3600  # Aliyun dates (SendDate, minute windows) are China time
_UNDECIDED = object()  # the action was not visible in the head: draw the fault later

_MESSAGES = {
    "Throttling.User": "Request was denied due to user flow control.",
    "SignatureDoesNotMatch": "Specified signature does not match our calculation.",
    "IncompleteSignature": "The request signature does not conform to Aliyun standards.",
    "InvalidAccessKeyId.NotFound": "Specified access key is not found.",
    "InvalidTimeStamp.Expired": "Specified time stamp or date value is expired.",
    "InvalidTimeStamp.Format": "Specified time stamp or date value is not well formatted.",
    "SignatureNonceUsed": "Specified signature nonce was used already.",
    "InvalidVersion": "Specified parameter Version is not valid.",
    "InvalidAction.NotFound": "Specified api is not found, please check your url and method.",
    "UnsupportedHTTPMethod": "This http method is not supported.",
    "InternalError": "The request processing has failed due to some unknown error, exception or failure.",
    "ServiceUnavailable": "The request has failed due to a temporary failure of the server.",
    "isv.MOBILE_COUNT_OVER_LIMIT": "The number of mobile numbers exceeds the limit.",
    "isv.MOBILE_NUMBER_ILLEGAL": "The mobile number is illegal.",
    "isv.INVALID_PARAMETERS": "Invalid parameters.",
    "isv.INVALID_JSON_PARAM": "JSON parameter is invalid: only string values are accepted.",
    "isv.SMS_SIGNATURE_ILLEGAL": "The signature is illegal.",
    "isv.BUSINESS_LIMIT_CONTROL": "Business flow control: the number was sent too often.",
    "isv.AMOUNT_NOT_ENOUGH": "The account balance is not enough.",
}


class _Reject(Exception):
    """A request refused with an Aliyun error (``status`` 200: a business error)."""

    def __init__(self, status: int, code: str, message: str | None = None) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message or _MESSAGES.get(code, code)


def _missing(name: str) -> _Reject:
    return _Reject(
        400,
        "MissingParameter",
        f'The input parameter "{name}" that is mandatory for processing this request is not supplied.',
    )


def phone_key(phone: str) -> str:
    """The index key of a number: mainland numbers lose ``+86``/``0086``/``86``."""
    if len(phone) == 11:
        return phone
    p = phone.removeprefix("+")
    p = p.removeprefix("00")
    return p[2:] if len(p) == 13 and p.startswith("861") else p


def _json_list(params: dict[str, str], name: str) -> list[Any]:
    try:
        value = orjson.loads(params[name])
    except orjson.JSONDecodeError:
        raise _Reject(200, "isv.INVALID_JSON_PARAM", f"{name} is not valid JSON.") from None
    if not isinstance(value, list):
        raise _Reject(200, "isv.INVALID_PARAMETERS", f"{name} must be a JSON array.")
    return value


def _parse_stamp(value: str) -> float | None:
    if len(value) != 20 or value[10] != "T" or value[19] != "Z":
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def _beijing(t: float, fmt: str) -> str:
    return time.strftime(fmt, time.gmtime(t + _BEIJING))


class AliyunGateway:
    """The dysmsapi endpoint (path ``/``); an :class:`~providers.simulator.server.App`."""

    def __init__(self, config: SimulatorConfig, stats: Stats, receipts: ReceiptLog) -> None:
        self._undelivered_rate = config.undelivered_rate
        self._cfg = config
        self._stats = stats
        self._receipts = receipts
        self._faults = FaultPlan(
            config.fault_rate, config.fault_mix, config.fault_rates, config.rng("faults")
        )
        self._jitter_rng = config.rng("jitter")
        self._ids = IdSource(config.rng("ids"))
        self._limiter = FixedWindowLimiter(config.qps, config.monotonic)
        self._nonces = NonceCache()
        self._secrets = {c.access_key_id: c.access_key_secret for c in config.resolved_credentials()}
        self._latency = config.latency_ms / 1000
        self._jitter = config.jitter_ms / 1000
        self._slow = config.slow_ms / 1000
        self._faulty = self._faults.total > 0

    def restore(self, records: Iterable[dict[str, Any]]) -> None:
        """Index receipts written before a restart (``_receipt_lines``), as if just accepted."""
        n = 0
        sends: dict[str, Sent] = {}
        for r in records:
            n += 1
            biz = str(r.get("biz_id", ""))
            sent = sends.get(biz)
            if sent is None:
                t = r.get("t")
                when = float(t) if isinstance(t, int | float) else 0.0
                sent = sends[biz] = Sent(str(r.get("out_id", "")), biz, str(r.get("template", "")), when)
            self._receipts.add([phone_key(r["phone"])], sent)
        self._ids.advance(n)

    # -- App ---------------------------------------------------------------------
    def on_head(self, request: Request) -> bool:
        """Draws the fault of a send request as its head arrives; ``drop_before`` closes here."""
        if not self._faulty:
            return True
        action = request.headers.get("x-acs-action")
        if action is None:
            q = request.query
            i = q.find("Action=")
            if i < 0 or (i and q[i - 1] != "&"):
                request.state = _UNDECIDED
                return True
            action = q[i + 7 :].partition("&")[0]
        if action not in SEND_ACTIONS:
            return True
        fault = self._faults.draw()
        if fault == "drop_before":
            self._stats.requests += 1
            self._stats.fault(fault)
            return False
        request.state = fault
        return True

    def handle(self, request: Request, conn: Connection) -> None:
        self._stats.requests += 1
        try:
            self._handle(request, conn)
        except _Reject as r:
            self._stats.reject(r.code)
            if r.status == 200:
                self._business(conn, r.code, r.message)
            else:
                self._gateway(conn, r.status, r.code, r.message)

    # -- the request path -----------------------------------------------------------
    def _handle(self, req: Request, conn: Connection) -> None:
        cfg = self._cfg
        if req.method != "POST" and req.method != "GET":
            raise _Reject(405, "UnsupportedHTTPMethod")
        query = parse_urlencoded(req.query) if req.query else []
        params = dict(query)
        if req.body:
            ctype = req.headers.get("content-type", "")
            if ctype.partition(";")[0].strip().lower() == "application/x-www-form-urlencoded":
                params.update(parse_urlencoded(req.body.decode("utf-8", "replace")))
        auth = req.headers.get("authorization", "")
        v3 = auth.startswith("ACS3-HMAC-SHA256")
        if v3:
            signed = parse_v3_authorization(auth)
            if signed is None:
                raise _Reject(400, "IncompleteSignature")
            key_id, action = signed[0], req.headers.get("x-acs-action", "")
        else:
            key_id, action = params.get("AccessKeyId", ""), params.get("Action", "")

        fault = req.state
        if fault is _UNDECIDED:
            fault = self._faults.draw() if action in SEND_ACTIONS else None
            if fault == "drop_before":  # the action was only in the body: drop it unprocessed
                self._stats.fault(fault)
                conn.drop()
                return
        if not action:
            raise _missing("x-acs-action" if v3 else "Action")
        self._stats.action(action)

        secret = ""
        if cfg.verify:
            if not key_id:
                raise _missing("AccessKeyId")
            found = self._secrets.get(key_id)
            if found is None:
                raise _Reject(404, "InvalidAccessKeyId.NotFound")
            secret = found

        wait = self._limiter.acquire(key_id)
        if wait is not None:
            self._stats.throttled += 1
            self._throttle(conn, wait)
            return
        if fault in PRE_FAULTS:
            self._pre_fault(conn, str(fault))
            return

        if cfg.verify:
            self._authenticate(req, params, query, v3, secret)

        if action in SEND_ACTIONS:
            self._send(conn, params, action, fault, key_id)
        elif action == "QuerySendDetails":
            conn.respond(200, self._query(params), delay=self._delay())
        elif action == "GetCardSmsDetails":
            conn.respond(200, self._card_query(params), delay=self._delay())
        else:
            raise _Reject(404, "InvalidAction.NotFound")

    def _authenticate(
        self, req: Request, params: dict[str, str], query: Sequence[tuple[str, str]], v3: bool, secret: str
    ) -> None:
        cfg = self._cfg
        h = req.headers
        if v3:
            ok = verify_v3(req.method, req.path, query, h, req.body, secret)
            version, stamp, nonce, window = (
                h.get("x-acs-version"),
                h.get("x-acs-date"),
                h.get("x-acs-signature-nonce"),
                V3_WINDOW,
            )
            names = ("x-acs-version", "x-acs-date", "x-acs-signature-nonce")
        else:
            if "Signature" not in params:
                raise _missing("Signature")
            ok = verify_v2(req.method, params, secret)
            version, stamp, nonce, window = (
                params.get("Version"),
                params.get("Timestamp"),
                params.get("SignatureNonce"),
                V2_WINDOW,
            )
            names = ("Version", "Timestamp", "SignatureNonce")
        if not ok:
            raise _Reject(400, "SignatureDoesNotMatch")
        if version is None:
            raise _missing(names[0])
        if version != API_VERSION:
            raise _Reject(400, "InvalidVersion")
        if cfg.check_time:
            if stamp is None:
                raise _missing(names[1])
            t = _parse_stamp(stamp)
            if t is None:
                raise _Reject(400, "InvalidTimeStamp.Format")
            if abs(cfg.clock() - t) > window:
                raise _Reject(400, "InvalidTimeStamp.Expired")
        if cfg.check_nonce:
            if not nonce:
                raise _missing(names[2])
            if self._nonces.seen(nonce, cfg.monotonic(), window):
                raise _Reject(400, "SignatureNonceUsed")

    # -- SendBatchSms / SendBatchCardSms ------------------------------------------------
    def _send(
        self, conn: Connection, params: dict[str, str], action: str, fault: object, key_id: str
    ) -> None:
        card = action == "SendBatchCardSms"
        phones, signs, template, out_id = _validate_send(params, card)
        n = len(phones)

        if fault == "business_error":
            self._stats.fault("business_error")
            code = self._cfg.business_error_code
            self._business(conn, code, _MESSAGES.get(code, code))
            return
        if self._cfg.bad_number_rate > 0 and any(map(self._cfg.is_bad_number, phones)):
            # One bad number refuses the whole call, and the answer does not say which.
            raise _Reject(200, "isv.MOBILE_NUMBER_ILLEGAL")

        # Accepted: record first (one write, flushed to the OS), answer after.
        biz = self._ids.biz_id()
        t = self._cfg.clock()
        self._receipts.write(_receipt_lines(phones, signs, out_id, biz, template, t), n)
        if self._receipts.index is not None:
            keys = phones if set(map(len, phones)) == {11} else [phone_key(p) for p in phones]
            self._receipts.add(keys, Sent(out_id, biz, template, t))
        self._stats.accept(key_id, n)
        rid = self._ids.request_id()
        if card:
            body = orjson.dumps(
                {
                    "Code": "OK",
                    "Success": True,
                    "RequestId": rid,
                    "Data": {
                        "BizCardId": biz,
                        "BizSmsId": "",
                        "BizDigitalId": "",
                        "MediaMobiles": ",".join(phones),
                        "NotMediaMobiles": "",
                        "CardTmpState": 1,
                    },
                }
            )
        else:
            body = b'{"Code":"OK","Message":"OK","BizId":"%s","RequestId":"%s"}' % (
                biz.encode(),
                rid.encode(),
            )
        delay = self._delay()
        if fault is None:
            conn.respond(200, body, delay=delay)
            return
        self._stats.fault(str(fault))
        if fault == "drop_after":
            conn.drop(delay=delay)
        elif fault == "reset":
            conn.reset(delay=delay)
        elif fault == "slow":
            conn.respond(200, body, delay=delay + self._slow)
        elif fault == "garbage":
            conn.respond(200, body[: len(body) // 2], delay=delay)
        else:
            raise AssertionError(f"unhandled fault {fault!r}")

    # -- QuerySendDetails ---------------------------------------------------------------------
    def _query(self, params: dict[str, str]) -> bytes:
        for name in ("PhoneNumber", "SendDate", "PageSize", "CurrentPage"):
            if not params.get(name):
                raise _missing(name)
        if self._receipts.index is None:
            raise _Reject(503, "ServiceUnavailable", "QuerySendDetails needs the simulator's receipt index.")
        phone, date = params["PhoneNumber"], params["SendDate"]
        size, page = params["PageSize"], params["CurrentPage"]
        if not (size.isascii() and size.isdigit() and 1 <= int(size) <= 50):
            raise _Reject(200, "isv.INVALID_PARAMETERS", "PageSize must be between 1 and 50.")
        if not (page.isascii() and page.isdigit() and int(page) >= 1):
            raise _Reject(200, "isv.INVALID_PARAMETERS", "CurrentPage must be a positive integer.")
        if not (len(date) == 8 and date.isascii() and date.isdigit()):
            raise _Reject(200, "isv.INVALID_PARAMETERS", "SendDate must be yyyyMMdd.")
        biz = params.get("BizId")
        rows = [
            s
            for s in self._receipts.lookup(phone_key(phone))
            if _beijing(s.t, "%Y%m%d") == date and (not biz or s.biz_id == biz)
        ]
        first = (int(page) - 1) * int(size)
        bad = self._undelivered_rate
        dtos = [
            {
                "PhoneNum": phone,
                **_fate(s.out_id, phone, bad),
                "TemplateCode": s.template,
                "Content": "",
                "SendDate": _beijing(s.t, "%Y-%m-%d %H:%M:%S"),
                "ReceiveDate": _beijing(s.t + 1, "%Y-%m-%d %H:%M:%S"),
                "OutId": s.out_id,
            }
            for s in rows[first : first + int(size)]
        ]
        return orjson.dumps(
            {
                "Code": "OK",
                "Message": "OK",
                "RequestId": self._ids.request_id(),
                "TotalCount": len(rows),
                "SmsSendDetailDTOs": {"SmsSendDetailDTO": dtos},
            }
        )

    def _card_query(self, params: dict[str, str]) -> bytes:
        """``GetCardSmsDetails``: the card sends to a number on a day (``SendStatus`` 3 = success)."""
        for name in ("PhoneNumber", "SendDate"):
            if not params.get(name):
                raise _missing(name)
        if self._receipts.index is None:
            raise _Reject(503, "ServiceUnavailable", "GetCardSmsDetails needs the simulator's receipt index.")
        phone, date = params["PhoneNumber"], params["SendDate"]
        biz = params.get("BizCardId")
        rows = [s for s in self._receipts.lookup(phone_key(phone))
                if _beijing(s.t, "%Y%m%d") == date and (not biz or s.biz_id == biz)]  # fmt: skip
        records = [
            {"OutId": s.out_id, **_fate(s.out_id, phone, self._undelivered_rate), "RenderStatus": 1,
             "ReceiveDate": _beijing(s.t + 1, "%Y-%m-%d %H:%M:%S"), "PhoneNumber": phone}
            for s in rows[:50]
        ]  # fmt: skip
        return orjson.dumps({
            "Code": "OK", "Message": "OK", "RequestId": self._ids.request_id(), "Success": True,
            "CardSendDetailDTO": {"TotalCount": len(rows), "Records": records},
        })  # fmt: skip

    # -- answers ---------------------------------------------------------------------------------
    def _delay(self) -> float:
        if self._jitter:
            return self._latency + self._jitter_rng.uniform(0, self._jitter)
        return self._latency

    def _gateway(
        self,
        conn: Connection,
        status: int,
        code: str,
        message: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        rid = self._ids.request_id()
        body = orjson.dumps(
            {
                "RequestId": rid,
                "HostId": HOST_ID,
                "Code": code,
                "Message": message or _MESSAGES.get(code, code),
                "Recommend": f"https://api.aliyun.com/troubleshoot?q={code}&product=Dysmsapi&requestId={rid}",
            }
        )
        conn.respond(status, body, headers, delay=self._delay())

    def _business(self, conn: Connection, code: str, message: str) -> None:
        body = orjson.dumps({"Code": code, "Message": message, "RequestId": self._ids.request_id()})
        conn.respond(200, body, delay=self._delay())

    def _throttle(self, conn: Connection, wait: float) -> None:
        headers = (
            [("x-acs-retry-after", str(max(1, int(wait * 1000 + 0.999))))]
            if self._cfg.retry_after_header
            else []
        )
        self._gateway(conn, 400, "Throttling.User", headers=headers)

    def _pre_fault(self, conn: Connection, fault: str) -> None:
        self._stats.fault(fault)
        if fault == "http500":
            self._gateway(conn, 500, "InternalError")
        elif fault == "http503":
            self._gateway(conn, 503, "ServiceUnavailable")
        else:  # throttle
            now = self._cfg.monotonic()
            self._throttle(conn, int(now) + 1 - now)


_NUMBERS = re.compile(r'\[\s*"\+?[0-9]{5,20}"(?:\s*,\s*"\+?[0-9]{5,20}")*\s*\]')
"""A JSON array of well-formed numbers (the common case, checked in one C-level match)."""


def _validate_send(params: dict[str, str], card: bool) -> tuple[list[str], list[str], str, str]:
    """(numbers, sign names, template code, OutId) of a send request, or raises its error."""
    template_name = "CardTemplateCode" if card else "TemplateCode"
    for name in (template_name, "PhoneNumberJson", "SignNameJson"):
        if not params.get(name):
            raise _missing(name)
    if card:
        fallback = params.get("FallbackType")
        if not fallback:
            raise _missing("FallbackType")
        need = {"SMS": "SmsTemplateCode", "DIGITALSMS": "DigitalTemplateCode"}.get(fallback)
        if fallback != "NONE" and need is None:
            raise _Reject(200, "isv.INVALID_PARAMETERS", "FallbackType must be SMS, DIGITALSMS or NONE.")
        if need and not params.get(need):
            raise _missing(need)
    phones = _json_list(params, "PhoneNumberJson")
    n = len(phones)
    if n > MAX_NUMBERS:
        raise _Reject(200, "isv.MOBILE_COUNT_OVER_LIMIT")
    if not n:
        raise _Reject(200, "isv.INVALID_PARAMETERS", "PhoneNumberJson is empty.")
    if _NUMBERS.fullmatch(params["PhoneNumberJson"]) is None:
        for p in phones:
            if type(p) is not str:
                raise _Reject(200, "isv.INVALID_JSON_PARAM")
            digits = p[1:] if p[:1] == "+" else p
            if not (digits.isascii() and digits.isdigit() and 5 <= len(digits) <= 20):
                raise _Reject(200, "isv.MOBILE_NUMBER_ILLEGAL", f"The mobile number {p[:24]!r} is illegal.")
    signs = _json_list(params, "SignNameJson")
    if len(signs) != n:
        raise _Reject(200, "isv.INVALID_PARAMETERS", "SignNameJson and PhoneNumberJson differ in length.")
    first = signs[0]
    if not (type(first) is str and first and signs.count(first) == n):
        for s in signs:
            if type(s) is not str:
                raise _Reject(200, "isv.INVALID_JSON_PARAM")
            if not s:
                raise _Reject(200, "isv.SMS_SIGNATURE_ILLEGAL")
    for name in (
        ("CardTemplateParamJson", "SmsTemplateParamJson", "DigitalTemplateParamJson", "TemplateParamJson")
        if card
        else ("TemplateParamJson",)
    ):
        if params.get(name):
            items = _json_list(params, name)
            if len(items) != n:
                raise _Reject(200, "isv.INVALID_PARAMETERS", f"{name} length differs.")
            if set(map(type, items)) != {dict}:
                raise _Reject(200, "isv.INVALID_JSON_PARAM")
            # Variable values must be strings (the card's own parameters are objects).
            if name != "CardTemplateParamJson" and not set(
                map(type, itertools.chain.from_iterable(map(dict.values, items)))
            ) <= {str}:
                raise _Reject(200, "isv.INVALID_JSON_PARAM")
    if params.get("SmsUpExtendCodeJson") and len(_json_list(params, "SmsUpExtendCodeJson")) != n:
        raise _Reject(200, "isv.INVALID_PARAMETERS", "SmsUpExtendCodeJson and PhoneNumberJson differ.")
    out_id = params.get("OutId", "")
    if len(out_id) >= 256:
        raise _Reject(200, "isv.INVALID_PARAMETERS", "OutId is too long.")
    return phones, signs, params[template_name], out_id


def _dumps(value: str) -> str:
    return orjson.dumps(value).decode()


def _fate(out_id: str, phone: str, rate: float) -> dict[str, int | str]:
    """``SendStatus`` 3 delivered or 2 failed, as the pushed receipt says (:func:`undelivered`)."""
    if undelivered(f"{out_id}|{phone[-11:]}", rate):
        return {"SendStatus": 2, "ErrCode": "MK:0001"}
    return {"SendStatus": 3, "ErrCode": "DELIVERED"}


def _receipt_lines(
    phones: list[str], signs: list[str], out_id: str, biz: str, template: str, t: float
) -> bytes:
    """One JSONL line per recipient; numbers are validated digits, so they need no escaping."""
    common = f'"out_id":{_dumps(out_id)},"biz_id":"{biz}","template":{_dumps(template)},"sign":'
    tail = f',"t":{t!r}}}\n'
    head = '{"phone":"'
    first = signs[0]
    if signs.count(first) == len(signs):
        post = '",' + common + _dumps(first) + tail
        return (head + (post + head).join(phones) + post).encode()
    cache: dict[str, str] = {}
    parts = []
    for p, s in zip(phones, signs, strict=True):
        js = cache.get(s)
        if js is None:
            js = cache[s] = _dumps(s)
        parts.append(f'{head}{p}",{common}{js}{tail}')
    return "".join(parts).encode()
