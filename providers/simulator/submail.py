"""The simulated SUBMAIL v4 SMS gateway: batchsend, multisend, multixsend, sms/log, service/timestamp.

Facts from PROTOCOLS.md §2 and SUBMAIL's docs repo; every path also answers
with a ``.json`` suffix. Bodies are ``application/x-www-form-urlencoded`` or
a JSON object of strings (integers are taken as their decimal text); query
parameters count as submitted too.

Order of checks on a send: appid, per-appid rate window (``submail_qps``),
injected pre-processing faults, ``sign_type``, timestamp (md5/sha1 only),
signature, ``tag``, then the API's own parameters.

Shapes (HTTP status / body)::

    whole-request error   400  {"status":"error","code":"108","msg":"..."}      code is a string
    batchsend             200  {"status":"success","batchlist":"<32 hex>","total_fee":n,
                                "responses":[{"status":"success","to":"138…","send_id":"<32 hex>","fee":1},
                                             {"status":"error","to":"12","code":252,"msg":"..."}]}
    multisend/multixsend  200  [{"status":"success","to":"138…","send_id":"<32 hex>","fee":1},
                                {"status":"error","code":252,"msg":"..."}]       one entry per multi item,
                                                                                 in order; no "to" on errors
    service/timestamp     200  {"timestamp":1700000000}
    sms/log               200  {"status":"success","start_date":s,"end_date":e,"total":n,"offset":o,
                                "results":rows,"data":[{"sendID","to","appid","template_id",
                                "sms_signature","sms_content","fee","status":"delivered",
                                "report_state":"DELIVRD","location","mobile_type","ip_address",
                                "send_at","sent_at","report_at"}]}
    throttle (fault, or submail_qps)  429 {"status":"error","msg":"Too Many Requests"} (+ Retry-After)
    http500 / http503 faults          500/503 {"status":"error","msg":"..."}

Inferred, not documented: per-recipient errors inside batchsend ``responses``
(they carry ``to``); 252 for an invalid or non-mainland number and for more
than 10 000 numbers; with ``bad_number_rate``, a batchsend holding a number
``config.is_bad_number`` picks refused whole with 252 (nothing recorded), and
that number's multi* entry answered with its 252 error object; 109 for a
wrong key in ``normal`` mode. The fee is the number of 70-character segments
(67 each once there are several) of the text including its 【signature】;
multixsend bills 1 (templates are not simulated).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson

from providers.simulator.config import SimulatorConfig
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

__all__ = ("MAX_NUMBERS", "SEND_APIS", "SubmailGateway", "segments")

MAX_NUMBERS = 10_000
SEND_APIS = frozenset({"batchsend", "multisend", "multixsend"})
SIGN_V2_EXCLUDED: Mapping[str, frozenset[str]] = {
    "batchsend": frozenset({"content"}),
    "multisend": frozenset({"multi", "content"}),
    "multixsend": frozenset({"multi", "content"}),
}
_PATHS = {
    "/sms/batchsend": "batchsend",
    "/sms/multisend": "multisend",
    "/sms/multixsend": "multixsend",
    "/sms/log": "log",
    "/service/timestamp": "timestamp",
}
_MOBILE = re.compile(r"1[0-9]{10}")
_PROJECT = re.compile(r"[0-9A-Za-z]{1,32}")
_VAR = re.compile(r"@var\(([^)]*)\)")
_DAY = 86_400

_MESSAGES = {
    "101": "Incorrect APP ID",
    "107": "Invalid sign_type",
    "108": "Invalid signature",
    "109": "Invalid appkey",
    "111": "Empty signature",
    "115": "This phone number request frequency limit",
    "151": "timestamp error",
    "152": "Invalid timestamp",
    "252": "Incorrect recipient message address",
    "305": "Project ID cannot be empty",
    "306": "Invalid Project ID",
    "307": "Incorrect json format, please check vars and link parameters",
    "310": "The tag is limited to 32 characters",
    "401": "Message signature cannot be empty",
    "403": "Message content cannot be empty",
    "404": "Please limit message content and signature to 1000 characters",
    "408": "You cannot send same messages to this contact",
    "410": "empty multi value",
    "413": "Please keep the SMS signature between 2 and 10 characters",
}


class _Reject(Exception):
    """A whole request refused with a SUBMAIL error code."""

    def __init__(self, code: str, msg: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.msg = msg or _MESSAGES.get(code, code)


def segments(text: str) -> int:
    """Billed segments: 70 characters in one, 67 each when there are more."""
    n = len(text)
    return 1 if n <= 70 else -(-n // 67)


def _error_entry(code: int, msg: str | None = None, to: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"status": "error"}
    if to is not None:
        entry["to"] = to
    entry["code"] = code
    entry["msg"] = msg or _MESSAGES.get(str(code), str(code))
    return entry


class _Request:
    """One accepted send request, shared by its rows."""

    __slots__ = ("appid", "batchlist", "project", "t")

    def __init__(self, appid: str, batchlist: str, project: str, t: int) -> None:
        self.appid = appid
        self.batchlist = batchlist
        self.project = project
        self.t = t


class _Row:
    """One accepted recipient, as ``sms/log`` reports it."""

    __slots__ = ("content", "fee", "req", "send_id", "to")

    def __init__(self, send_id: str, to: str, fee: int, content: str, req: _Request) -> None:
        self.send_id = send_id
        self.to = to
        self.fee = fee
        self.content = content
        self.req = req

    def as_log(self, undelivered_rate: float = 0.0) -> dict[str, Any]:
        t = self.req.t
        bad = undelivered(self.send_id, undelivered_rate)
        sign = self.content[: self.content.find("】") + 1] if self.content.startswith("【") else ""
        return {
            "sendID": self.send_id,
            "to": self.to,
            "appid": self.req.appid,
            "template_id": self.req.project,
            "sms_signature": sign,
            "sms_content": self.content,
            "fee": self.fee,
            "status": "dropped" if bad else "delivered",
            "report_state": "UNDELIV" if bad else "DELIVRD",
            "location": "",
            "mobile_type": "",
            "ip_address": "127.0.0.1",
            "send_at": t,
            "sent_at": t,
            "report_at": t + 1,
        }


class _LogIndex:
    """Accepted recipients by send order, number, send_id and batchlist."""

    def __init__(self) -> None:
        self.rows: list[_Row] = []
        self.by_to: dict[str, list[_Row]] = {}
        self.by_send_id: dict[str, _Row] = {}
        self.by_batch: dict[str, list[_Row]] = {}

    def add(self, rows: list[_Row]) -> None:
        self.rows.extend(rows)
        for row in rows:
            self.by_to.setdefault(row.to, []).append(row)
            self.by_send_id[row.send_id] = row
        if rows and rows[0].req.batchlist:
            self.by_batch.setdefault(rows[0].req.batchlist, []).extend(rows)


def _int_param(value: str | None, default: int) -> int:
    return int(value) if value and value.isascii() and value.isdigit() else default


class SubmailGateway:
    """The SUBMAIL endpoints; an :class:`~providers.simulator.server.App` for every path in :meth:`routes`."""

    def __init__(self, config: SimulatorConfig, stats: Stats, receipts: ReceiptLog) -> None:
        self._undelivered_rate = config.undelivered_rate
        self._cfg = config
        self._stats = stats
        self._receipts = receipts
        self._faults = FaultPlan(
            config.fault_rate, config.fault_mix, config.fault_rates, config.rng("submail", "faults")
        )
        self._pacer = Pacer(
            config.latency_ms, config.jitter_ms, config.slow_ms, config.rng("submail", "jitter")
        )
        self._ids = IdSource(config.rng("submail", "ids"))
        self._limiter = FixedWindowLimiter(config.submail_qps, config.monotonic)
        self._keys = {app.appid: app.appkey for app in config.resolved_submail()}
        self._hot = config.submail_hot_numbers
        self._index = _LogIndex() if config.index_receipts else None
        self._log_cache: dict[str, tuple[float, bytes]] = {}

    def restore(self, records: Iterable[dict[str, Any]]) -> None:
        """Index receipts written before a restart (:meth:`_record`), as if just accepted."""
        n = 0
        requests: dict[tuple[str, str, str, int], _Request] = {}
        for r in records:
            n += 1
            if self._index is None:
                continue
            t = r.get("t")
            when = int(t) if isinstance(t, int | float) else 0
            key = (str(r.get("appid", "")), str(r.get("batchlist", "")), str(r.get("project", "")), when)
            req = requests.get(key)
            if req is None:
                req = requests[key] = _Request(*key)
            fee = r.get("fee")
            fee_n = fee if isinstance(fee, int) else 1
            row = _Row(str(r.get("send_id", "")), r["phone"], fee_n, str(r.get("content", "")), req)
            self._index.add([row])
        self._ids.advance(n)

    def routes(self) -> dict[str, App]:
        """Every path this gateway serves, with and without ``.json``."""
        return {p: self for path in _PATHS for p in (path, path + ".json")}

    # -- App -----------------------------------------------------------------------------
    def on_head(self, request: Request) -> bool:
        """Draws the fault of a send request; ``drop_before`` closes here."""
        if _PATHS[request.path.removesuffix(".json")] not in SEND_APIS:
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
            self._stats.reject(f"submail.{r.code}")
            body = orjson.dumps({"status": "error", "code": r.code, "msg": r.msg})
            conn.respond(400, body, delay=self._pacer.delay())

    # -- the request path ---------------------------------------------------------------------
    def _handle(self, req: Request, conn: Connection) -> None:
        api = _PATHS[req.path.removesuffix(".json")]
        self._stats.action(f"submail.{api}")
        if api == "timestamp":
            if req.method not in ("GET", "POST"):
                self._http_error(conn, 405, "use GET or POST", [("Allow", "GET, POST")])
                return
            conn.respond(200, b'{"timestamp":%d}' % int(self._cfg.clock()), delay=self._pacer.delay())
            return
        if req.method != "POST":
            self._http_error(conn, 405, "use POST", [("Allow", "POST")])
            return
        params, repeated = _params(req)
        cfg = self._cfg
        appid = params.get("appid", "")
        appkey = self._keys.get(appid)
        if cfg.verify and appkey is None:
            raise _Reject("101")
        wait = self._limiter.acquire(appid)
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
                self._http_error(conn, 500, "Internal Server Error")
            else:
                self._http_error(conn, 503, "Service Unavailable")
            return
        if cfg.verify:
            assert appkey is not None
            self._authenticate(api, params, repeated, appid, appkey)
        tag = params.get("tag", "")
        if len(tag) > 32:
            raise _Reject("310")
        if api == "log":
            conn.respond(200, self._log(appid, params), delay=self._pacer.delay())
        else:
            self._send(conn, api, params, appid, tag, fault)

    def _authenticate(
        self, api: str, params: dict[str, str], repeated: set[str], appid: str, appkey: str
    ) -> None:
        signature = params.get("signature", "")
        if not signature:
            raise _Reject("111")
        sign_type = params.get("sign_type", "normal").lower()
        if sign_type == "normal":
            if not hmac.compare_digest(signature.encode(), appkey.encode()):
                raise _Reject("109")
            return
        if sign_type not in ("md5", "sha1"):
            raise _Reject("107")
        if self._cfg.check_time:
            stamp = params.get("timestamp", "")
            if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
                raise _Reject("151")
            if abs(self._cfg.clock() - int(stamp)) > self._cfg.submail_timestamp_window_s:
                raise _Reject("152")
        exclude = {"signature", "tag", *repeated}  # only single-valued parameters are signed
        if params.get("sign_version") == "2":
            exclude |= SIGN_V2_EXCLUDED.get(api, frozenset())
        joined = "&".join(f"{k}={params[k]}" for k in sorted(params) if k not in exclude)
        text = f"{appid}{appkey}{joined}{appid}{appkey}".encode()
        expected = (hashlib.md5 if sign_type == "md5" else hashlib.sha1)(text).hexdigest()
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise _Reject("108")

    # -- sends -------------------------------------------------------------------------------------
    def _send(
        self, conn: Connection, api: str, params: dict[str, str], appid: str, tag: str, fault: object
    ) -> None:
        business = fault == "business_error"
        code = self._cfg.submail_business_error_code
        project = batchlist = ""
        if api == "batchsend":
            content = _checked_content(params.get("content", ""))
            numbers = [n.strip() for n in params.get("to", "").split(",")]
            if len(numbers) > MAX_NUMBERS:
                raise _Reject("252", f"to: at most {MAX_NUMBERS} numbers per request")
            if self._cfg.bad_number_rate > 0 and any(map(self._cfg.is_bad_number, numbers)):
                raise _Reject("252")  # one bad number refuses the call; which one is not said
            if business:
                self._stats.fault("business_error")
                raise _Reject(code)
            fee = segments(content)
            planned = [(n, content, fee, self._refusal(n)) for n in numbers]
            if all(refusal is not None for *_, refusal in planned):
                first = planned[0][3]
                assert first is not None
                raise _Reject(str(first[0]), first[1])
            batchlist = self._ids.hex_id()
        else:
            if api == "multisend":
                template = _checked_content(params.get("content", ""))
            else:
                project = params.get("project", "")
                if not project:
                    raise _Reject("305")
                if _PROJECT.fullmatch(project) is None:
                    raise _Reject("306")
                template = ""
            planned = self._plan_multi(params.get("multi", ""), template)
            if business:
                self._stats.fault("business_error")
                entry = _error_entry(int(code) if code.isdigit() else 0, _MESSAGES.get(code))
                conn.respond(200, orjson.dumps([entry] * len(planned)), delay=self._pacer.delay())
                return

        # Accepted recipients: record first (one write), answer after.
        t = self._cfg.clock()
        req = _Request(appid, batchlist, project, int(t))
        rows: list[_Row] = []
        entries: list[dict[str, Any]] = []
        for to, text, fee, refusal in planned:
            if refusal is not None:
                entries.append(_error_entry(refusal[0], refusal[1], to if api == "batchsend" else None))
                continue
            row = _Row(self._ids.hex_id(), to, fee, text, req)
            rows.append(row)
            entries.append({"status": "success", "to": to, "send_id": row.send_id, "fee": fee})
        if rows:
            self._record(rows, tag, t)
        if api == "batchsend":
            body = orjson.dumps(
                {
                    "status": "success",
                    "batchlist": batchlist,
                    "total_fee": sum(r.fee for r in rows),
                    "responses": entries,
                }
            )
        else:
            body = orjson.dumps(entries)
        self._pacer.finish(conn, body, fault, self._stats)

    def _refusal(self, number: str) -> tuple[int, str] | None:
        """Why one recipient is refused (code, msg), or None."""
        if _MOBILE.fullmatch(number) is None or self._cfg.is_bad_number(number):
            return 252, f"{_MESSAGES['252']}: {number[:24]!r}"
        if number in self._hot:
            return 115, _MESSAGES["115"]
        return None

    def _plan_multi(self, multi: str, template: str) -> list[tuple[str, str, int, tuple[int, str] | None]]:
        """(to, text, fee, refusal) per ``multi`` item; ``template`` empty: multixsend (fee 1)."""
        try:
            items = orjson.loads(multi) if multi else None
        except orjson.JSONDecodeError:
            items = None
        if not isinstance(items, list) or not items:
            raise _Reject("410")
        out: list[tuple[str, str, int, tuple[int, str] | None]] = []
        for item in items:
            to = item.get("to") if isinstance(item, dict) else None
            if not isinstance(to, str):
                out.append(("", "", 0, (252, "multi item without a to")))
                continue
            variables = item.get("vars", {})
            if not isinstance(variables, dict):
                out.append((to, "", 0, (307, _MESSAGES["307"])))
                continue
            text = _render(template, variables) if template else ""
            refusal = self._refusal(to)
            if refusal is None and len(text) > 1000:
                refusal = (404, _MESSAGES["404"])
            out.append((to, text, segments(text) if template else 1, refusal))
        return out

    def _record(self, rows: list[_Row], tag: str, t: float) -> None:
        req = rows[0].req
        request = orjson.dumps({"appid": req.appid, "batchlist": req.batchlist, "project": req.project})
        common = f'","out_id":{orjson.dumps(tag).decode()},"provider":"submail","t":{t!r},'
        common += request[1:-1].decode()
        data = "".join(  # numbers are digits; what sms/log reports, for a restart (restore)
            f'{{"phone":"{r.to}{common},"send_id":"{r.send_id}","fee":{r.fee},"content":'
            f"{orjson.dumps(r.content).decode()}}}\n"
            for r in rows
        )
        self._receipts.write(data.encode(), len(rows))
        if self._index is not None:
            self._index.add(rows)
        self._stats.accept(req.appid, len(rows))

    # -- sms/log -----------------------------------------------------------------------------------
    def _log(self, appid: str, params: dict[str, str]) -> bytes:
        if self._index is None:
            raise _Reject("119", "sms/log needs the simulator's receipt index")
        interval = self._cfg.submail_log_interval_s
        now = self._cfg.monotonic()
        cached = self._log_cache.get(appid)
        if cached is not None and now - cached[0] < interval:
            return cached[1]  # documented: inside the interval, the previous result again
        body = self._log_query(params.get("app") or appid, params)
        if interval > 0:
            self._log_cache[appid] = (now, body)
        return body

    def _log_query(self, appid: str, params: dict[str, str]) -> bytes:
        index = self._index
        assert index is not None
        wall = int(self._cfg.clock())
        end = _int_param(params.get("end_date"), wall)
        start = _int_param(params.get("start_date"), end - _DAY)
        rows_per_page = min(max(_int_param(params.get("rows"), 50), 1), 1000)
        offset = _int_param(params.get("offset"), 0)
        send_id, sendlist, to = params.get("send_id"), params.get("sendlist"), params.get("to")
        candidates: Iterable[_Row]
        if send_id:
            found = index.by_send_id.get(send_id)
            candidates = [found] if found is not None else []
        elif sendlist:
            candidates = index.by_batch.get(sendlist, [])
        elif to:
            candidates = index.by_to.get(to, [])
        else:
            candidates = index.rows
        checks: list[Callable[[_Row], bool]] = [
            lambda r: r.req.appid == appid,
            lambda r: start <= r.req.t <= end,
        ]
        if sendlist:
            checks.append(lambda r: r.req.batchlist == sendlist)
        if to:
            checks.append(lambda r: r.to == to)
        matched = [r for r in candidates if all(check(r) for check in checks)]
        if params.get("status"):
            wanted = params["status"]
            matched = [r for r in matched if r.as_log(self._undelivered_rate)["status"] == wanted]
        page = matched[offset : offset + rows_per_page]
        return orjson.dumps(
            {
                "status": "success",
                "start_date": start,
                "end_date": end,
                "total": len(matched),
                "offset": offset,
                "results": rows_per_page,
                "data": [r.as_log(self._undelivered_rate) for r in page],
            }
        )

    # -- answers -------------------------------------------------------------------------------------
    def _http_error(
        self, conn: Connection, status: int, msg: str, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        body = orjson.dumps({"status": "error", "msg": msg})
        conn.respond(status, body, headers, delay=self._pacer.delay())

    def _throttle(self, conn: Connection, wait: float) -> None:
        headers = [("Retry-After", str(max(1, int(wait + 0.999))))] if self._cfg.retry_after_header else []
        self._http_error(conn, 429, "Too Many Requests", headers)


def _params(req: Request) -> tuple[dict[str, str], set[str]]:
    """The submitted parameters (query, then body) and the names given more than once."""
    pairs = parse_urlencoded(req.query) if req.query else []
    if req.body:
        ctype = req.headers.get("content-type", "").partition(";")[0].strip().lower()
        if ctype == "application/json" or (not ctype and req.body[:1] == b"{"):
            try:
                data = orjson.loads(req.body)
            except orjson.JSONDecodeError:
                raise _Reject("307", "the JSON body is not valid JSON") from None
            if not isinstance(data, dict):
                raise _Reject("307", "the JSON body must be an object")
            for k, v in data.items():
                if isinstance(v, int) and not isinstance(v, bool):
                    v = str(v)
                if not isinstance(v, str):
                    raise _Reject("307", f"the JSON value of {k!r} must be a string")
                pairs.append((k, v))
        else:
            pairs.extend(parse_urlencoded(req.body.decode("utf-8", "replace")))
    params = dict(pairs)
    if len(params) == len(pairs):
        return params, set()
    seen: set[str] = set()
    repeated: set[str] = set()
    for k, _ in pairs:
        (repeated if k in seen else seen).add(k)
    return params, repeated


def _checked_content(content: str) -> str:
    """The text of a batchsend/multisend: non-empty, 【2-10 chars】 first, at most 1000 characters."""
    if not content:
        raise _Reject("403")
    end = content.find("】")
    if not content.startswith("【") or end < 0:
        raise _Reject("401")
    if not 2 <= end - 1 <= 10:
        raise _Reject("413")
    if len(content) > 1000:
        raise _Reject("404")
    return content


def _render(template: str, variables: dict[str, Any]) -> str:
    """``@var(key)`` → the value (strings as is, other JSON values as JSON); unknown keys stay."""

    def value(m: re.Match[str]) -> str:
        if m.group(1) not in variables:
            return m.group()
        v = variables[m.group(1)]
        return v if isinstance(v, str) else orjson.dumps(v).decode()

    return _VAR.sub(value, template) if "@var(" in template else template
