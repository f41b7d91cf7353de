"""The simulated Aliyun dysmsapi gateway: SendBatchSms, SendBatchCardSms, QuerySendDetails.

Checks signatures (V3 and V2), timestamps, nonces, the 100-number limit and a
per-AccessKeyId request rate in fixed one-second windows, answering with the
provider's own error shapes; injects faults; records every accepted recipient.
"""

from __future__ import annotations

import asyncio
import calendar
import itertools
import os
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson

from providers.aliyun import AliyunCredentials, parse_v3_authorization, verify_v2, verify_v3
from providers.simulator.server import Abort, Close, Outcome, Request, Response

__all__ = ("FAULT_KINDS", "AliyunGateway", "GatewayConfig")

FAULT_KINDS = ("http500", "http503", "throttle", "drop_before", "drop_after", "slow", "reset", "garbage",
               "business_error")


@dataclass(frozen=True)
class GatewayConfig:
    credentials: AliyunCredentials
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    qps: int = 0  # per AccessKeyId, fixed one-second windows; 0 = unlimited
    fault_rate: float = 0.0
    fault_mix: Mapping[str, float] = field(default_factory=lambda: dict.fromkeys(FAULT_KINDS, 1.0))
    slow_ms: float = 10_000.0
    verify: bool = True
    check_time: bool = True
    retry_after_header: bool = True
    index_receipts: bool = True
    seed: int | None = None


def _gateway_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps({"RequestId": str(uuid.uuid4()).upper(), "HostId": "dysmsapi.aliyuncs.com",
                         "Code": code, "Message": message, "Recommend": ""})
    return Response(status, body, headers or {})


def _business_error(code: str, message: str) -> Response:
    return Response(200, orjson.dumps({"Code": code, "Message": message, "RequestId": str(uuid.uuid4()).upper()}))


def _parse_time(value: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(value, "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


class AliyunGateway:
    """Request handler; one instance per simulator."""

    def __init__(
        self,
        config: GatewayConfig,
        receipts: Path | None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        kinds = [k for k in FAULT_KINDS if config.fault_mix.get(k, 0) > 0]
        self._kinds = kinds
        self._weights = [config.fault_mix[k] for k in kinds]
        self._monotonic = monotonic
        self._wall = wall
        self._windows: dict[str, tuple[int, int]] = {}
        self._nonces: dict[str, float] = {}
        self._nonce_order: deque[tuple[float, str]] = deque()
        self._receipts_fd = (
            os.open(receipts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600) if receipts else None
        )
        self._index: dict[str, list[tuple[str, str, float, str]]] = {}
        self._biz = itertools.count(900619746936498440)
        self._drop_next: set[int] = set()
        self.stats: dict[str, Any] = {"requests": 0, "accepted": 0, "throttled": 0, "faults": {},
                                      "rejected": {}}

    def close(self) -> None:
        if self._receipts_fd is not None:
            os.close(self._receipts_fd)
            self._receipts_fd = None

    # -- faults -------------------------------------------------------------
    def _fault(self) -> str | None:
        if self.config.fault_rate <= 0 or not self._kinds or self._rng.random() >= self.config.fault_rate:
            return None
        kind = self._rng.choices(self._kinds, self._weights)[0]
        faults = self.stats["faults"]
        faults[kind] = faults.get(kind, 0) + 1
        return kind

    def on_head(self, req: Request) -> bool:
        """Decides the fault for a request as its head arrives; False drops it unread."""
        kind = self._fault()
        if kind == "drop_before":
            self.stats["requests"] += 1
            return False
        req.headers["x-sim-fault"] = kind or ""
        return True

    # -- the request path ------------------------------------------------------
    def _reject(self, code: str) -> None:
        rej = self.stats["rejected"]
        rej[code] = rej.get(code, 0) + 1

    def _throttled(self, key_id: str) -> Response | None:
        if self.config.qps <= 0:
            return None
        now = self._monotonic()
        window = int(now)
        start, count = self._windows.get(key_id, (window, 0))
        if start != window:
            start, count = window, 0
        if count >= self.config.qps:
            self.stats["throttled"] += 1
            headers = {}
            if self.config.retry_after_header:
                headers["x-acs-retry-after"] = str(max(1, int((window + 1 - now) * 1000)))
            return _gateway_error(400, "Throttling.User", "Request was denied due to user flow control.", headers)
        self._windows[key_id] = (start, count + 1)
        return None

    def _nonce_used(self, nonce: str, ttl: float) -> bool:
        now = self._wall()
        while self._nonce_order and self._nonce_order[0][0] < now - ttl:
            _, old = self._nonce_order.popleft()
            self._nonces.pop(old, None)
        if nonce in self._nonces:
            return True
        self._nonces[nonce] = now
        self._nonce_order.append((now, nonce))
        return False

    def _authenticate(self, req: Request, params: dict[str, str], query: list[tuple[str, str]]) -> tuple[
        str, str
    ] | Response:
        """Returns (action, access key id) or the error response."""
        cfg = self.config
        auth = req.headers.get("authorization")
        if auth:
            parsed = parse_v3_authorization(auth)
            if parsed is None:
                return _gateway_error(400, "IncompleteSignature", "The request signature does not conform.")
            key_id, action = parsed[0], req.headers.get("x-acs-action", "")
            stamp, nonce, ttl = req.headers.get("x-acs-date", ""), req.headers.get("x-acs-signature-nonce", ""), 900.0
        else:
            key_id, action = params.get("AccessKeyId", ""), params.get("Action", "")
            stamp, nonce, ttl = params.get("Timestamp", ""), params.get("SignatureNonce", ""), 31 * 60.0
        if not cfg.verify:
            return action, key_id
        if key_id != cfg.credentials.access_key_id:
            return _gateway_error(404, "InvalidAccessKeyId.NotFound", "Specified access key is not found.")
        secret = cfg.credentials.access_key_secret
        ok = (
            verify_v3(req.method, req.path or "/", query, req.headers, req.body, secret)
            if auth
            else verify_v2(req.method, params, secret)
        )
        if not ok:
            return _gateway_error(400, "SignatureDoesNotMatch", "Specified signature is not matched with our calculation.")
        if cfg.check_time:
            t = _parse_time(stamp)
            if t is None or abs(self._wall() - t) > ttl:
                return _gateway_error(400, "InvalidTimeStamp.Expired", "Specified time stamp or date value is expired.")
        if not nonce:
            return _gateway_error(400, "MissingParameter", "SignatureNonce is mandatory for this action.")
        if cfg.check_time and self._nonce_used(nonce, ttl):
            return _gateway_error(400, "SignatureNonceUsed", "Specified signature nonce was used already.")
        return action, key_id

    async def handle(self, req: Request) -> Outcome:
        if req.path == "/__stats":
            return Response(200, orjson.dumps(self.stats))
        fault = req.headers.pop("x-sim-fault", "")
        self.stats["requests"] += 1
        query = parse_qsl(req.query, keep_blank_values=True)
        params = dict(query)
        if req.body and "x-www-form-urlencoded" in req.headers.get("content-type", ""):
            params.update(parse_qsl(req.body.decode("utf-8", "replace"), keep_blank_values=True))
        who = self._authenticate(req, params, query)
        if isinstance(who, Response):
            self._reject(orjson.loads(who.body)["Code"])
            return who
        action, key_id = who
        throttled = self._throttled(key_id)
        if throttled is not None:
            return throttled
        if fault == "throttle":
            return _gateway_error(400, "Throttling.User", "Request was denied due to user flow control.")
        if fault in ("http500", "http503"):
            status = 500 if fault == "http500" else 503
            code = "InternalError" if status == 500 else "ServiceUnavailable"
            return _gateway_error(status, code, "The request processing has failed due to some unknown error.")
        if fault == "business_error":
            return _business_error("isv.MOBILE_NUMBER_ILLEGAL", "illegal mobile number")
        if action in ("SendBatchSms", "SendBatchCardSms"):
            resp = self._send(action, params)
        elif action == "QuerySendDetails":
            resp = self._query(params)
        else:
            return _gateway_error(404, "InvalidAction.NotFound", f"Specified api is not found: {action}")
        if self.config.latency_ms or self.config.jitter_ms:
            delay = self.config.latency_ms + self._rng.uniform(0, self.config.jitter_ms)
            await asyncio.sleep(delay / 1000)
        if resp.status != 200 or b'"Code":"OK"' not in resp.body:
            return resp
        if fault == "drop_after":
            return Close()
        if fault == "reset":
            return Abort()
        if fault == "slow":
            await asyncio.sleep(self.config.slow_ms / 1000)
        if fault == "garbage":
            return Response(200, resp.body[: len(resp.body) // 2])
        return resp

    # -- actions -----------------------------------------------------------------
    def _send(self, action: str, params: dict[str, str]) -> Response:
        card = action == "SendBatchCardSms"
        template = params.get("CardTemplateCode" if card else "TemplateCode")
        if not template or "PhoneNumberJson" not in params or "SignNameJson" not in params:
            missing = next(
                p for p in ("CardTemplateCode" if card else "TemplateCode", "PhoneNumberJson", "SignNameJson")
                if not params.get(p)
            )
            self._reject("MissingParameter")
            return _gateway_error(400, "MissingParameter", f"{missing} is mandatory for this action.")
        try:
            phones = orjson.loads(params["PhoneNumberJson"])
            signs = orjson.loads(params["SignNameJson"])
            tparams = orjson.loads(params["TemplateParamJson"]) if params.get("TemplateParamJson") else None
        except orjson.JSONDecodeError:
            self._reject("isv.INVALID_JSON_PARAM")
            return _business_error("isv.INVALID_JSON_PARAM", "JSON parameter is invalid")
        if not isinstance(phones, list) or not all(isinstance(p, str) for p in phones) or not phones:
            self._reject("isv.INVALID_PARAMETERS")
            return _business_error("isv.INVALID_PARAMETERS", "PhoneNumberJson must be a list of strings")
        if len(phones) > 100:
            self._reject("isv.MOBILE_COUNT_OVER_LIMIT")
            return _business_error("isv.MOBILE_COUNT_OVER_LIMIT", "too many mobile numbers")
        if not isinstance(signs, list) or len(signs) != len(phones):
            self._reject("isv.INVALID_PARAMETERS")
            return _business_error("isv.INVALID_PARAMETERS", "SignNameJson does not match PhoneNumberJson")
        if tparams is not None and (not isinstance(tparams, list) or len(tparams) != len(phones)):
            self._reject("isv.INVALID_PARAMETERS")
            return _business_error("isv.INVALID_PARAMETERS", "TemplateParamJson does not match PhoneNumberJson")
        out_id = params.get("OutId", "")
        biz = f"{next(self._biz)}^0"
        self._record(phones, signs, out_id, biz, template)
        if card:
            body = {"Code": "OK", "Success": True, "RequestId": str(uuid.uuid4()).upper(),
                    "Data": {"BizCardId": biz, "BizSmsId": "", "BizDigitalId": "", "MediaMobiles": ",".join(phones),
                             "NotMediaMobiles": "", "CardTmpState": 1}}
            return Response(200, orjson.dumps(body))
        return Response(200, orjson.dumps({"Code": "OK", "Message": "OK", "BizId": biz,
                                           "RequestId": str(uuid.uuid4()).upper()}))

    def _record(self, phones: list[str], signs: list[Any], out_id: str, biz: str, template: str) -> None:
        now = round(self._wall(), 3)
        self.stats["accepted"] += len(phones)
        if self._receipts_fd is not None:
            lines = b"".join(
                orjson.dumps({"phone": p, "out_id": out_id, "biz_id": biz, "template": template, "sign": s,
                              "t": now}) + b"\n"
                for p, s in zip(phones, signs, strict=True)
            )
            os.write(self._receipts_fd, lines)
        if self.config.index_receipts:
            for p in phones:
                self._index.setdefault(p, []).append((out_id, biz, now, template))

    def _query(self, params: dict[str, str]) -> Response:
        phone, date = params.get("PhoneNumber", ""), params.get("SendDate", "")
        if not phone or not date:
            return _gateway_error(400, "MissingParameter", "PhoneNumber and SendDate are mandatory.")
        try:
            size = max(1, min(50, int(params.get("PageSize", "10"))))
            page = max(1, int(params.get("CurrentPage", "1")))
        except ValueError:
            return _gateway_error(400, "InvalidParameter", "PageSize and CurrentPage must be numbers.")
        biz = params.get("BizId")
        rows = [r for r in self._index.get(phone, []) if time.strftime("%Y%m%d", time.localtime(r[2])) == date
                and (not biz or r[1] == biz)]
        chosen = rows[(page - 1) * size : page * size]
        dtos = [{"PhoneNum": phone, "SendStatus": 3, "ErrCode": "DELIVERED", "TemplateCode": r[3], "Content": "",
                 "SendDate": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r[2])),
                 "ReceiveDate": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r[2])), "OutId": r[0]}
                for r in chosen]
        return Response(200, orjson.dumps({"Code": "OK", "Message": "OK", "RequestId": str(uuid.uuid4()).upper(),
                                           "TotalCount": len(rows),
                                           "SmsSendDetailDTOs": {"SmsSendDetailDTO": dtos}}))
