"""Aliyun dysmsapi (2017-05-25): SendBatchSms, signed with V3 or RPC V2. Sans-I/O.

Facts from PROTOCOLS.md §1. Placement follows the official Tea SDK: ``TemplateCode``
and ``OutId`` in the query, the JSON parameters in a form body. The verification
functions at the bottom are what the local simulator checks requests with.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
import urllib.parse
import uuid
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import httpx
import orjson

from providers.base import Batch, BatchOutcome, Clock, Message, NonceSource, Outcome

__all__ = (
    "CODE_CLASSES",
    "TEST_CREDENTIALS",
    "AliyunCredentials",
    "AliyunSms",
    "CredentialsError",
    "classify",
    "parse_v3_authorization",
    "percent_encode",
    "rpc_signature",
    "rpc_string_to_sign",
    "v3_canonical_request",
    "v3_signature",
    "verify_v2",
    "verify_v3",
)

API_VERSION = "2017-05-25"
DEFAULT_ENDPOINT = "https://dysmsapi.aliyuncs.com"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class CredentialsError(Exception):
    """A credential environment variable is missing (the message names it, never a value)."""


@dataclass(frozen=True)
class AliyunCredentials:
    access_key_id: str
    access_key_secret: str = field(repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> AliyunCredentials:
        for name in ("ALIYUN_ACCESS_KEY_ID", "ALIYUN_ACCESS_KEY_SECRET"):
            if not environ.get(name):
                raise CredentialsError(f"environment variable {name} is not set")
        return cls(environ["ALIYUN_ACCESS_KEY_ID"], environ["ALIYUN_ACCESS_KEY_SECRET"])


TEST_CREDENTIALS = AliyunCredentials("testid", "testsecret")
"""The documented test credentials (the official SDK captures are signed with them)."""


# -- percent-encoding -----------------------------------------------------------
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")
_ASCII_TABLE = {i: (chr(i) if chr(i) in _SAFE else f"%{i:02X}") for i in range(128)}


def percent_encode(s: str) -> str:
    """RFC 3986 encoding as Aliyun signs it: UTF-8, ``A-Za-z0-9-_.~`` kept, ``%XX`` upper-case.

    Same bytes as ``urllib.parse.quote(s, safe="-_.~")``, several times faster on
    the ASCII JSON that makes up a batch.
    """
    if s.isascii():
        if s.isalnum():
            return s
        return s.translate(_ASCII_TABLE)
    return urllib.parse.quote(s, safe="-_.~")


def _canonical_query(pairs: Sequence[tuple[str, str]]) -> str:
    return "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in sorted(pairs))


# -- V2 (RPC, HMAC-SHA1) ----------------------------------------------------------
def rpc_string_to_sign(method: str, params: Mapping[str, str]) -> str:
    query = _canonical_query([(k, v) for k, v in params.items() if k != "Signature"])
    return f"{method.upper()}&%2F&{percent_encode(query)}"


def rpc_signature(method: str, params: Mapping[str, str], secret: str) -> str:
    mac = hmac.new(f"{secret}&".encode(), rpc_string_to_sign(method, params).encode(), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode()


# -- V3 (ACS3-HMAC-SHA256) ------------------------------------------------------------
def v3_canonical_request(
    method: str,
    path: str,
    query: Sequence[tuple[str, str]],
    headers: Mapping[str, str],
    signed_headers: Sequence[str],
    body_sha256: str,
) -> str:
    """``headers`` keyed by lower-case name; ``signed_headers`` lower-case, sorted."""
    canonical_headers = "".join(f"{h}:{headers.get(h, '').strip()}\n" for h in signed_headers)
    return "\n".join(
        (
            method.upper(),
            path,
            _canonical_query(query),
            canonical_headers,
            ";".join(signed_headers),
            body_sha256,
        )
    )


def v3_signature(canonical_request: str, secret: str) -> str:
    to_sign = "ACS3-HMAC-SHA256\n" + hashlib.sha256(canonical_request.encode()).hexdigest()
    return hmac.new(secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()


def parse_v3_authorization(value: str) -> tuple[str, list[str], str] | None:
    """``ACS3-HMAC-SHA256 Credential=..,SignedHeaders=..,Signature=..`` → its three parts."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme != "ACS3-HMAC-SHA256":
        return None
    parts = dict(p.strip().partition("=")[::2] for p in rest.split(","))
    try:
        return parts["Credential"], parts["SignedHeaders"].split(";"), parts["Signature"]
    except KeyError:
        return None


def verify_v2(method: str, params: Mapping[str, str], secret: str) -> bool:
    """Check an RPC V2 request: ``params`` are query plus form-body parameters, decoded."""
    given = params.get("Signature")
    if not given:
        return False
    return hmac.compare_digest(rpc_signature(method, params, secret), given)


def verify_v3(
    method: str,
    path: str,
    query: Sequence[tuple[str, str]],
    headers: Mapping[str, str],
    body: bytes,
    secret: str,
) -> bool:
    """Check a V3 request; ``headers`` keyed by lower-case name."""
    auth = parse_v3_authorization(headers.get("authorization", ""))
    if auth is None:
        return False
    _, signed, given = auth
    body_hash = hashlib.sha256(body).hexdigest()
    if headers.get("x-acs-content-sha256") != body_hash:
        return False
    if "host" not in signed or any(h not in headers for h in signed):
        return False
    expected = v3_signature(
        v3_canonical_request(method, path or "/", query, headers, signed, body_hash), secret
    )
    return hmac.compare_digest(expected, given)


# -- error classes (PROTOCOLS.md §1.7-1.8) -------------------------------------------------
_CLASSES: dict[Outcome, tuple[str, ...]] = {
    Outcome.SENT: ("OK",),
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
        # auth
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "InvalidAccessKeyId.NotFound",
        "Forbidden.RAM",
        "isp.RAM_PERMISSION_DENY",
        "isv.DENY_IP_RANGE",
        # account / balance
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
    # Rejected before processing: a fresh timestamp and nonce make a resend safe.
    Outcome.RETRY: ("InvalidTimeStamp.Expired", "SignatureNonceUsed"),
    Outcome.THROTTLED: ("Throttling.User", "Throttling.Api", "Throttling"),
    # Per-number frequency control: the number stays blocked for its window.
    Outcome.DEFER: ("isv.BUSINESS_LIMIT_CONTROL",),
    # The message may already have been accepted.
    Outcome.UNKNOWN: ("isp.SYSTEM_ERROR", "isp.UNKNOWN_ERROR", "InternalError", "ServiceUnavailable"),
}
CODE_CLASSES: Mapping[str, Outcome] = {code: cls for cls, codes in _CLASSES.items() for code in codes}


def classify(code: str, http_status: int) -> Outcome:
    """The class of a provider code.

    An unrecognised code on a 5xx is ambiguous. Any other unrecognised code is
    treated as a whole-request refusal (FATAL): it stops the run with the code
    shown and leaves the recipients pending, which is recoverable; marking
    millions of recipients ``failed`` on a code we do not understand is not.
    """
    known = CODE_CLASSES.get(code)
    if known is not None:
        return known
    if code.startswith("Throttling"):
        return Outcome.THROTTLED
    return Outcome.UNKNOWN if http_status >= 500 else Outcome.FATAL


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait, from ``x-acs-retry-after`` (milliseconds, UNVERIFIED) or ``Retry-After``."""
    raw = response.headers.get("x-acs-retry-after")
    scale = 1000.0
    if raw is None:
        raw, scale = response.headers.get("retry-after"), 1.0
    if raw is None:
        return None
    try:
        value = float(raw) / scale
    except ValueError:
        return None
    return value if 0 <= value < 3600 else None


def aliyun_phone(phone: str) -> str:
    """E.164 digits → Aliyun's form: bare 11 digits for mainland mobiles, else CC + number."""
    if len(phone) == 13 and phone.startswith("861"):
        return phone[2:]
    return phone


class AliyunSms:
    """SendBatchSms: one template, up to 100 numbers, a sign name per number."""

    name = "aliyun"
    max_batch_size = 100
    action = "SendBatchSms"

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
        self._creds = credentials
        self.template_code = template_code
        self._url = httpx.URL(endpoint)
        self._host = self._url.netloc.decode("ascii")
        self._base = f"{self._url.scheme}://{self._host}"
        self._signature = signature
        self._clock = clock
        self._nonce = nonce
        self._region = region_id

    def batch_key(self, message: Message) -> Hashable:
        return None  # the template is campaign-wide; sign names go per number

    def _business(self, batch: Batch) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(query parameters, form parameters) of the batch."""
        msgs = batch.messages
        query = [("TemplateCode", self.template_code)]
        if batch.out_id:
            query.append(("OutId", batch.out_id))
        form = [
            ("PhoneNumberJson", orjson.dumps([aliyun_phone(m.phone) for m in msgs]).decode()),
            ("SignNameJson", orjson.dumps([m.sign_name for m in msgs]).decode()),
        ]
        if any(m.params for m in msgs):
            form.append(("TemplateParamJson", orjson.dumps([m.params for m in msgs]).decode()))
        return query, form

    def build_request(self, batch: Batch) -> httpx.Request:
        query, form = self._business(batch)
        now = time.gmtime(self._clock())
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", now)
        if self._signature == "v2":
            query += [
                ("Action", self.action),
                ("Version", API_VERSION),
                ("Format", "JSON"),
                ("AccessKeyId", self._creds.access_key_id),
                ("SignatureMethod", "HMAC-SHA1"),
                ("SignatureVersion", "1.0"),
                ("SignatureNonce", self._nonce()),
                ("Timestamp", stamp),
            ]
            if self._region:
                query.append(("RegionId", self._region))
            query.append(
                ("Signature", rpc_signature("POST", dict(query + form), self._creds.access_key_secret))
            )
        body = "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in form).encode()
        qs = "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in query)
        headers = {
            "host": self._host,
            "content-type": "application/x-www-form-urlencoded",
            "accept": "application/json",
        }
        if self._signature == "v3":
            body_hash = hashlib.sha256(body).hexdigest()
            headers.update(
                {
                    "x-acs-action": self.action,
                    "x-acs-version": API_VERSION,
                    "x-acs-date": stamp,
                    "x-acs-signature-nonce": self._nonce(),
                    "x-acs-content-sha256": body_hash,
                }
            )
            signed = sorted(h for h in headers if h in ("host", "content-type") or h.startswith("x-acs-"))
            canonical = v3_canonical_request("POST", "/", query, headers, signed, body_hash)
            sig = v3_signature(canonical, self._creds.access_key_secret)
            headers["authorization"] = (
                f"ACS3-HMAC-SHA256 Credential={self._creds.access_key_id},"
                f"SignedHeaders={';'.join(signed)},Signature={sig}"
            )
        return httpx.Request("POST", httpx.URL(f"{self._base}/?{qs}"), headers=headers, content=body)

    def parse_response(self, batch: Batch, response: httpx.Response) -> BatchOutcome:
        status = response.status_code
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("Code"), str):
            if status == 429:
                return BatchOutcome(
                    Outcome.THROTTLED, code=f"HTTP{status}", retry_after=_retry_after(response)
                )
            # 2xx or 5xx with an unreadable body: the request reached the provider.
            kind = Outcome.FATAL if 400 <= status < 500 else Outcome.UNKNOWN
            return BatchOutcome(kind, code=f"HTTP{status}", message="unreadable response body")
        code: str = data["Code"]
        extra = {"request_id": data["RequestId"]} if "RequestId" in data else {}
        if code == "OK" and status < 300:
            return BatchOutcome(Outcome.SENT, code="OK", provider_id=data.get("BizId"), extra=extra)
        outcome = classify(code, status)
        return BatchOutcome(
            outcome,
            code=code,
            message=str(data.get("Message", ""))[:200] or None,
            retry_after=_retry_after(response),
            extra=extra,
        )
