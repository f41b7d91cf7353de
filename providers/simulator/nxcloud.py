"""The simulated NXCloud SMS gateway: batch ``POST /v1/sms/multi/mt`` and the legacy ``POST /api/sms/get``.

Responses in the shapes of the seed (``seeds/003_*.txt``, its examples)::

    200 {"code":0,"message":"Success","data":[
            {"phone":"8618651883168","messageid":"msg001","status":"Success"},
            {"phone":"8613812345279","messageid":"msg002","status":"Failure",
             "message":"Incorrect phone number format"}]}
    200 {"code":9000,"message":"Request parameter error","data":null}

``data`` has one item per request item, in order; ``messageid`` is the item's
``sysMessageId`` (or 32 generated hex). A bad number (not 5-20 digits, or
``config.is_bad_number``) gets a ``Failure`` item and is not recorded; with
``nxcloud_refuse_bad_numbers`` the whole call is refused instead (13005, data
null; the seed's table has the code, the shape is INFERRED from its other
error examples). Whole-request codes, each with ``data: null``: 1001 a required
header missing, 1002 bizType/action/algorithm/ts/body malformed, 1003 signature
mismatch, 1004 ``ts`` more than 60 s away, 1005 unknown accessKey, 13002 wrong
appKey, 9000 items missing, empty, over 200, not objects, or an invalid
``sysMessageId``; 13001 an item over 1000 characters, 13009 an empty one, 13006
a bad ``sourceAddress``; 13007 a number over ``nxcloud_number_hourly_limit``
accepted messages in the last hour (off by default; the whole call, INFERRED);
13008 over the TPS limit (and the ``throttle`` fault), with ``Retry-After``.
The http500/http503 faults answer ``{"code":500|503,...}`` with that status.
A ``business_error`` fault answers every item ``Failure`` (or, with
``nxcloud_business_error_code`` set, that code for the whole call).

Order of checks: headers present, accessKey, TPS window, injected
pre-processing faults, bizType/action, ts, signature, body, appKey, items
(9000, then 13009/13001/13006 per item), bad numbers (13005 when refused
whole), the hourly limit, a ``business_error`` fault.

Record query (documented; form ``appkey``, ``secretkey``, ``messageid``,
``date`` = yyyyMMdd in China time, last 31 days)::

    200 {"code":"0","row":{"msgid","phone","body","senderid","date","dr_time","dr":"DELIVRD",
                           "dr_status":"Successful","billing_size","billing_price","billing_status",
                           "network"}}
    200 {"code":"0","row":null}     not found (UNVERIFIED: the docs show no such answer)
    200 {"code":"1"|"2"|"3","msg":"..."}   params invalid | keys invalid | older than 31 days
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import re
import time
from collections.abc import Iterable
from datetime import date, datetime, timedelta
from typing import Any

import orjson

from providers.simulator.config import NxcloudAccount, SimulatorConfig
from providers.simulator.core import (
    PRE_FAULTS,
    FaultPlan,
    FixedWindowLimiter,
    IdSource,
    Pacer,
    ReceiptLog,
    Stats,
)
from providers.simulator.push import undelivered
from providers.simulator.server import App, Connection, Request, parse_urlencoded

__all__ = ("MAX_ITEMS", "SEND_PATH", "NxcloudGateway")

SEND_PATH = "/v1/sms/multi/mt"
RECORD_PATH = "/api/sms/get"
MAX_ITEMS = 200
TS_WINDOW_MS = 60_000
BIZ_TYPE = "3"
ACTION = "mtsend"
_BEIJING = 8 * 3600  # NXCloud's dates are China time
_STAMP = "%Y-%m-%d %H:%M:%S"
_REQUIRED = ("accesskey", "ts", "biztype", "action", "sign")
_MESSAGE_ID = re.compile(r"[0-9A-Za-z-]{10,50}")
_SENDER = re.compile(r"[0-9A-Za-z]{1,20}")

_MESSAGES = {  # the seed's code table; 1001-1005 from the signing convention page
    -1: "Failure",
    0: "Success",
    1001: "Missing common header parameters",
    1002: "Parameter error",
    1003: "Invalid signature",
    1004: "Timestamp expired",
    1005: "Insufficient permissions",
    1100: "Customer does not exist / Status is unavailable",
    1102: "Insufficient balance",
    9000: "Request parameter error",
    13001: "Exceeded content length limit (1000 characters)",
    13002: "Unavailable app or incorrect key",
    13003: "IP not in whitelist",
    13005: "Incorrect phone number format",
    13006: "Incorrect source address (Source address must consist of 1 to 20 alphanumeric characters "
    "(letters or digits))",
    13007: "Rate limit exceeded (5 messages per hour)",
    13008: "TPS limit exceeded",
    13009: "Empty content or illegal Keywords",
    13010: "Exceeding maximum numbers for verification channel",
}
BAD_NUMBER = _MESSAGES[13005]
MAX_CONTENT = 1000
HOUR = 3600.0


class _Reject(Exception):
    """A whole-request refusal. Codes of the seed's table answer the seed's text (``detail``, what
    was wrong, is only for the reader of this code); the auth codes answer the detail if any."""

    def __init__(self, code: int, detail: str | None = None) -> None:
        super().__init__(code, detail)
        self.code = code
        seed_text = _MESSAGES.get(code) if not 1000 <= code < 1100 else None
        self.message = seed_text or detail or _MESSAGES.get(code, str(code))


class _Record:
    """One accepted item, as the record query reports it."""

    __slots__ = ("content", "message_id", "phone", "sender", "t")

    def __init__(self, message_id: str, phone: str, content: str, sender: str, t: float) -> None:
        self.message_id = message_id
        self.phone = phone
        self.content = content
        self.sender = sender
        self.t = t

    def as_row(self, undelivered_rate: float = 0.0) -> dict[str, Any]:
        bad = undelivered(self.message_id, undelivered_rate)
        gsm = self.content.isascii()
        single, multi = (160, 153) if gsm else (70, 67)
        n = len(self.content)
        return {
            "msgid": self.message_id,
            "phone": self.phone,
            "body": self.content,
            "senderid": self.sender,
            "date": _beijing(self.t, _STAMP),
            "dr_time": _beijing(self.t + 1, _STAMP),
            "dr": "UNDELIV" if bad else "DELIVRD",
            "dr_status": "Failed" if bad else "Successful",
            "billing_size": 1 if n <= single else -(-n // multi),
            "billing_price": 0.0,
            "billing_status": "Yes",
            "network": "",
        }


def _beijing(t: float, fmt: str) -> str:
    return time.strftime(fmt, time.gmtime(t + _BEIJING))


def _sign(headers: dict[str, str], body: bytes, secret: str, sha256: bool) -> str:
    """The documented string: the four headers A→Z, ``&body=`` + the exact bytes (when any), the secret."""
    text = (
        f"accessKey={headers['accesskey']}&action={headers['action']}&bizType={headers['biztype']}"
        f"&ts={headers['ts']}"
    ).encode()
    if body:
        text += b"&body=" + body
    text += b"&accessSecret=" + secret.encode()
    return (hashlib.sha256 if sha256 else hashlib.md5)(text).hexdigest()


class NxcloudGateway:
    """The NXCloud endpoints; an :class:`~providers.simulator.server.App` for both paths in :meth:`routes`."""

    def __init__(self, config: SimulatorConfig, stats: Stats, receipts: ReceiptLog) -> None:
        self._undelivered_rate = config.undelivered_rate
        self._cfg = config
        self._stats = stats
        self._receipts = receipts
        self._faults = FaultPlan(
            config.fault_rate, config.fault_mix, config.fault_rates, config.rng("nxcloud", "faults")
        )
        self._pacer = Pacer(
            config.latency_ms, config.jitter_ms, config.slow_ms, config.rng("nxcloud", "jitter")
        )
        self._ids = IdSource(config.rng("nxcloud", "ids"))
        tps = config.qps if config.nxcloud_tps is None else config.nxcloud_tps
        self._limiter = FixedWindowLimiter(tps, config.monotonic)
        self._accounts: dict[str, NxcloudAccount] = {a.access_key: a for a in config.resolved_nxcloud()}
        self._index: dict[str, list[_Record]] | None = {} if config.index_receipts else None
        self._recent: dict[str, collections.deque[float]] = {}  # number → accepted times, last hour

    def restore(self, records: Iterable[dict[str, Any]]) -> None:
        """Index receipts written before a restart (:meth:`_store`), as if just accepted."""
        n = 0
        for r in records:
            n += 1
            t = r.get("t")
            when = float(t) if isinstance(t, int | float) else 0.0
            record = _Record(
                str(r.get("message_id", "")),
                r["phone"],
                str(r.get("content", "")),
                str(r.get("sender", "")),
                when,
            )
            if self._index is not None:
                self._index.setdefault(record.message_id, []).append(record)
        self._ids.advance(n)

    def routes(self) -> dict[str, App]:
        return {SEND_PATH: self, RECORD_PATH: self}

    # -- App ---------------------------------------------------------------------------------
    def on_head(self, request: Request) -> bool:
        """Draws the fault of a send request; ``drop_before`` closes here."""
        if request.path != SEND_PATH:
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
        record = request.path == RECORD_PATH
        self._stats.action("nxcloud.record" if record else "nxcloud.mt")
        if request.method != "POST":
            body = orjson.dumps({"code": 1002, "message": "use POST"})
            conn.respond(405, body, [("Allow", "POST")], delay=self._pacer.delay())
            return
        if record:
            conn.respond(200, self._record_query(request), delay=self._pacer.delay())
            return
        try:
            self._send(request, conn)
        except _Reject as r:
            self._stats.reject(f"nxcloud.{r.code}")
            self._answer(conn, 200, r.code, r.message)

    # -- /v1/sms/multi/mt --------------------------------------------------------------------------
    def _send(self, req: Request, conn: Connection) -> None:
        cfg = self._cfg
        h = req.headers
        account: NxcloudAccount | None = None
        if cfg.verify:
            if not all(h.get(name) for name in _REQUIRED):
                raise _Reject(1001)
            account = self._accounts.get(h["accesskey"])
            if account is None:
                raise _Reject(1005)
        wait = self._limiter.acquire(h.get("accesskey", ""))
        if wait is not None:
            self._stats.throttled += 1
            self._throttle(conn, wait)
            return
        fault = req.state
        if fault in PRE_FAULTS:
            self._stats.fault(str(fault))
            if fault == "throttle":
                now = cfg.monotonic()
                self._throttle(conn, int(now) + 1 - now)
            elif fault == "http500":
                self._answer(conn, 500, 500, "Internal Server Error")
            else:
                self._answer(conn, 503, 503, "Service Unavailable")
            return
        if account is not None:
            self._authenticate(h, req.body, account.access_secret)
        try:
            data = orjson.loads(req.body)
        except orjson.JSONDecodeError:
            raise _Reject(1002, "the body is not JSON") from None
        if not isinstance(data, dict):
            raise _Reject(1002, "the body must be a JSON object")
        if account is not None and data.get("appKey") != account.app_key:
            raise _Reject(13002)
        items = data.get("items")
        if not isinstance(items, list) or not items:
            raise _Reject(9000, "items must be a non-empty array")
        if len(items) > MAX_ITEMS:
            raise _Reject(9000, f"at most {MAX_ITEMS} items per request")
        planned = [_check_item(item) for item in items]
        bad = [not _is_number(phone) or cfg.is_bad_number(phone) for phone, *_ in planned]
        if cfg.nxcloud_refuse_bad_numbers and any(bad):
            raise _Reject(13005)
        t = cfg.clock()
        if cfg.nxcloud_number_hourly_limit:
            self._check_hourly(planned, bad, t)

        if fault == "business_error":
            self._stats.fault("business_error")
            code = cfg.nxcloud_business_error_code
            if code:
                raise _Reject(code)
            failed = [_item(p, sys_id or self._ids.hex_id(), BAD_NUMBER) for p, _, sys_id, _ in planned]
            conn.respond(200, _ok(failed), delay=self._pacer.delay())
            return

        # Accepted items: record first (one write), answer after.
        results = []
        records: list[tuple[_Record, str]] = []
        for (phone, content, sys_id, sender), refused in zip(planned, bad, strict=True):
            message_id = sys_id or self._ids.hex_id()
            if refused:
                self._stats.reject("nxcloud.item_failure")
                results.append(_item(phone, message_id, BAD_NUMBER))
                continue
            records.append((_Record(message_id, phone, content, sender, t), sys_id))
            results.append(_item(phone, message_id))
        if records:
            self._store(records, t, h.get("accesskey", ""))
        self._pacer.finish(conn, _ok(results), fault, self._stats)

    def _check_hourly(self, planned: list[tuple[str, str, str, str]], bad: list[bool], t: float) -> None:
        """13007 for the whole call when a number would pass its hourly limit; else count the call's."""
        limit = self._cfg.nxcloud_number_hourly_limit
        wanted: dict[str, int] = {}
        for (phone, *_), refused in zip(planned, bad, strict=True):
            if not refused:
                wanted[phone] = wanted.get(phone, 0) + 1
        for phone, n in wanted.items():
            recent = self._recent.get(phone)
            while recent and recent[0] <= t - HOUR:
                recent.popleft()
            if (len(recent) if recent else 0) + n > limit:
                raise _Reject(13007)
        for phone, n in wanted.items():
            self._recent.setdefault(phone, collections.deque()).extend([t] * n)

    def _authenticate(self, h: dict[str, str], body: bytes, secret: str) -> None:
        if h["biztype"] != BIZ_TYPE or h["action"] != ACTION:
            raise _Reject(1002, f"this API takes bizType {BIZ_TYPE} and action {ACTION}")
        algorithm = h.get("algorithm", "md5").lower()
        if algorithm not in ("md5", "sha256"):
            raise _Reject(1002, "algorithm must be md5 or sha256")
        if self._cfg.check_time:
            ts = h["ts"]
            if not (ts.isascii() and ts.isdigit() and len(ts) <= 16):
                raise _Reject(1002, "ts must be milliseconds since the epoch")
            if abs(self._cfg.clock() * 1000 - int(ts)) > TS_WINDOW_MS:
                raise _Reject(1004)
        expected = _sign(h, body, secret, algorithm == "sha256")
        if not hmac.compare_digest(expected.encode(), h["sign"].encode()):
            raise _Reject(1003)

    def _store(self, records: list[tuple[_Record, str]], t: float, account: str) -> None:
        tail = f',"provider":"nxcloud","t":{t!r}}}\n'
        lines = [  # content and sender: what the record query reports, for a restart (restore)
            f'{{"phone":"{r.phone}","out_id":{orjson.dumps(sys_id).decode()},"message_id":'
            f"{orjson.dumps(r.message_id).decode()},"
            f"{orjson.dumps({'content': r.content, 'sender': r.sender})[1:-1].decode()}{tail}"
            for r, sys_id in records
        ]
        self._receipts.write("".join(lines).encode(), len(records))
        if self._index is not None:
            for r, _ in records:
                self._index.setdefault(r.message_id, []).append(r)
        self._stats.accept(account, len(records))

    # -- /api/sms/get ---------------------------------------------------------------------------------
    def _record_query(self, req: Request) -> bytes:
        form = dict(parse_urlencoded(req.body.decode("utf-8", "replace")))
        appkey, secret = form.get("appkey", ""), form.get("secretkey", "")
        message_id, day = form.get("messageid", ""), form.get("date", "")
        if not (appkey and secret and message_id and day):
            return _record_error("1", "params invalid")
        if self._cfg.verify and not any(
            a.app_key == appkey and hmac.compare_digest(a.app_secret.encode(), secret.encode())
            for a in self._accounts.values()
        ):
            return _record_error("2", "keys invalid")
        try:
            wanted = datetime.strptime(day, "%Y%m%d").date() if len(day) == 8 and day.isdigit() else None
        except ValueError:
            wanted = None
        if wanted is None:
            return _record_error("1", "params invalid")
        today = date.fromisoformat(_beijing(self._cfg.clock(), "%Y-%m-%d"))
        if today - wanted > timedelta(days=31):
            return _record_error("3", "Only recent 31 days")
        if self._index is None:
            return _record_error("1", "the record query needs the simulator's receipt index")
        for r in self._index.get(message_id, ()):
            if _beijing(r.t, "%Y%m%d") == day:
                return orjson.dumps({"code": "0", "row": r.as_row(self._undelivered_rate)})
        return b'{"code":"0","row":null}'

    # -- answers -------------------------------------------------------------------------------------------
    def _answer(
        self, conn: Connection, status: int, code: int, message: str, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        body = orjson.dumps({"code": code, "message": message, "data": None})
        conn.respond(status, body, headers, delay=self._pacer.delay())

    def _throttle(self, conn: Connection, wait: float) -> None:
        headers = [("Retry-After", str(max(1, int(wait + 0.999))))] if self._cfg.retry_after_header else []
        self._answer(conn, 200, 13008, _MESSAGES[13008], headers)


def _check_item(item: object) -> tuple[str, str, str, str]:
    """(phone, content, sysMessageId, sourceAddress) of one item; a fault of the request raises."""
    if not isinstance(item, dict):
        raise _Reject(9000, "every item must be an object")
    sys_id = item.get("sysMessageId")
    if sys_id is not None and not (isinstance(sys_id, str) and _MESSAGE_ID.fullmatch(sys_id)):
        raise _Reject(9000, "sysMessageId must be 10-50 characters of [0-9a-zA-Z-]")
    phone, content, sender = item.get("phone"), item.get("content"), item.get("sourceAddress")
    if not isinstance(content, str) or not content:
        raise _Reject(13009)
    if len(content) > MAX_CONTENT:
        raise _Reject(13001)
    if sender is not None and not (isinstance(sender, str) and _SENDER.fullmatch(sender)):
        raise _Reject(13006)
    return phone if isinstance(phone, str) else "", content, sys_id or "", sender or ""


def _is_number(phone: str) -> bool:
    return phone.isascii() and phone.isdigit() and 5 <= len(phone) <= 20


def _item(phone: str, message_id: str, failure: str | None = None) -> dict[str, str]:
    if failure is None:
        return {"phone": phone, "messageid": message_id, "status": "Success"}
    return {"phone": phone, "messageid": message_id, "status": "Failure", "message": failure}


def _ok(items: list[dict[str, str]]) -> bytes:
    return orjson.dumps({"code": 0, "message": "Success", "data": items})


def _record_error(code: str, msg: str) -> bytes:
    return orjson.dumps({"code": code, "msg": msg})
