"""SUBMAIL SMS v4 (``api-v4.mysubmail.com``): signing, requests, per-recipient outcomes.

Sans-I/O. Facts are from PROTOCOLS.md §2 and SUBMAIL's docs repo. Three send modes:

``batchsend``
    One ``content`` to up to 10 000 numbers (``to`` comma-separated). Messages are grouped
    by the exact text sent, so personalised text degenerates to one number per request:
    use ``multisend`` for that.
``multisend``
    A campaign-wide ``content`` with ``@var(key)`` placeholders plus ``multi``, a JSON array
    of ``{"to":…,"vars":{…}}`` (the vars are ``Message.params``).
``multixsend``
    A template ``project`` plus ``multi`` with per-recipient vars.

``multi*`` have no documented cap; SUBMAIL recommends 50–200 recipients per request (and
more requests in parallel rather than bigger ones). ``sms/*`` is mainland China only:
other numbers are sent as ``+<digits>`` and SUBMAIL refuses them.

Authentication: ``normal`` sends the app key as ``signature`` (over TLS). ``md5``/``sha1``
sign ``appid + appkey + k=v&… + appid + appkey`` (names sorted, raw values, ``signature``
and ``tag`` never signed; with ``sign_version=2`` the large fields are left out as well,
see :data:`SIGN_V2_EXCLUDED`). The ``timestamp`` must be within **6 s** of SUBMAIL's clock
(error 152), so build each request just before sending it. A sans-I/O module cannot fetch
``/service/timestamp`` itself: the engine sends :meth:`SubmailSms.timestamp_request`,
reads it with :func:`parse_timestamp` and calls :meth:`SubmailSms.set_server_offset`;
until then the local clock is used as is.

Body: ``application/x-www-form-urlencoded`` by default. The signature is over the decoded
values, so the encoding cannot change it; a form carries ``multi`` as one plain string
(JSON would nest it as a JSON string inside JSON), and a form body is what SUBMAIL's own
curl examples and PHP SDK send. ``body_format="json"`` sends the official Python demo's
shape instead (a JSON object whose values are all strings).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import time
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import orjson

from providers import submail_receipts
from providers.aliyun_sign import percent_encode
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
    fill_template,
    match_entries,
    result_code,
    retry_after_seconds,
    sign_and_params,
    summarize,
)
from providers.spec import (
    ClockSync,
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
    "MAX_BATCH",
    "SIGNATURE_WINDOW",
    "SIGN_V2_EXCLUDED",
    "SPEC",
    "SPLIT_CODES",
    "CredentialsError",
    "SubmailCredentials",
    "SubmailError",
    "SubmailSms",
    "classify",
    "match_entries",
    "parse_log",
    "parse_timestamp",
    "string_to_sign",
    "submail_phone",
    "submail_signature",
    "submail_text",
    "summarize",
    "verify",
)

DEFAULT_ENDPOINT = "https://api-v4.mysubmail.com"
MAX_BATCH = 10_000
SIGNATURE_WINDOW = 6.0  # seconds a timestamp stays valid (error 152 after)
_FORM = "application/x-www-form-urlencoded"

Mode = Literal["batchsend", "multisend", "multixsend"]
SignType = Literal["normal", "md5", "sha1"]

SIGN_V2_EXCLUDED: Mapping[str, frozenset[str]] = {
    "sms/send": frozenset({"content"}),
    "sms/batchsend": frozenset({"content"}),
    "internationalsms/batchsend": frozenset({"content"}),
    "sms/multisend": frozenset({"multi", "content"}),
    "sms/multixsend": frozenset({"multi", "content"}),
    # The page says "content is excluded" (the API has none); whether ``vars`` is signed is
    # UNVERIFIED. Not implemented here; pass ``v2_excluded`` if you add it.
    "sms/batchxsend": frozenset({"content"}),
    "sms/log": frozenset(),
}
"""Fields left out of the signature with ``sign_version=2``, per API path (on top of
``signature`` and ``tag``, which are never signed)."""


# -- credentials --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SubmailCredentials:
    appid: str
    appkey: str = field(repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> SubmailCredentials:
        """Read ``SUBMAIL_APPID`` and ``SUBMAIL_APPKEY``."""
        names = ("SUBMAIL_APPID", "SUBMAIL_APPKEY")
        values = [environ.get(name, "").strip() for name in names]
        missing = [name for name, value in zip(names, values, strict=True) if not value]
        if missing:
            raise CredentialsError(f"environment variable {' and '.join(missing)} is not set or empty")
        return cls(values[0], values[1])


class SubmailError(Exception):
    """A reconciliation call (``sms/log``, ``service/timestamp``) did not answer with data."""

    def __init__(self, code: str, message: str | None = None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


# -- signing --------------------------------------------------------------------------------
_NEVER_SIGNED = frozenset({"signature", "tag"})


def string_to_sign(params: Mapping[str, str], appid: str, appkey: str, exclude: Collection[str] = ()) -> str:
    """``appid + appkey + k1=v1&k2=v2… + appid + appkey``: names A→Z, raw values."""
    joined = "&".join(
        [f"{k}={params[k]}" for k in sorted(params) if k not in _NEVER_SIGNED and k not in exclude]
    )
    return f"{appid}{appkey}{joined}{appid}{appkey}"


def submail_signature(
    params: Mapping[str, str],
    appid: str,
    appkey: str,
    sign_type: Literal["md5", "sha1"],
    exclude: Collection[str] = (),
) -> str:
    """Lower-case hex md5/sha1 of the UTF-8 :func:`string_to_sign`."""
    data = string_to_sign(params, appid, appkey, exclude).encode()
    return hashlib.md5(data).hexdigest() if sign_type == "md5" else hashlib.sha1(data).hexdigest()


def verify(
    path: str,
    params: Mapping[str, str],
    credentials: SubmailCredentials,
    v2_excluded: Mapping[str, Collection[str]] = SIGN_V2_EXCLUDED,
) -> bool:
    """Check a request's (decoded) parameters the way SUBMAIL does, timestamp age aside."""
    given = params.get("signature", "")
    if params.get("appid") != credentials.appid or not given.isascii():
        return False
    sign_type = params.get("sign_type", "normal").lower()
    if sign_type == "normal":
        expected = credentials.appkey
    elif sign_type in ("md5", "sha1"):
        exclude = v2_excluded.get(path.strip("/"), ()) if params.get("sign_version") == "2" else ()
        kind: Literal["md5", "sha1"] = "md5" if sign_type == "md5" else "sha1"
        expected = submail_signature(params, credentials.appid, credentials.appkey, kind, exclude)
    else:
        return False
    return expected.isascii() and hmac.compare_digest(expected.encode(), given.encode())


# -- outcome classes (PROTOCOLS.md §2.5) ------------------------------------------------------
_CLASSES: dict[Outcome, tuple[str, ...]] = {
    # This recipient is at fault: blocklisted, unsubscribed, bad address, duplicate, banned word.
    Outcome.FAILED: ("114", "253", "251", "252", "408", "405"),
    Outcome.FATAL: (
        # auth
        "101", "102", "103", "104", "105", "106", "107", "110", "108", "109", "111", "113", "119",
        # balance / quota (901 resets daily: resume tomorrow)
        "901", "903", "904", "905",
        # template / signature / parameters
        "116", "117", "118", "120", "305", "306", "406", "407", "307", "310",
        "401", "402", "403", "404", "411", "412", "413", "414", "415", "416", "417", "418", "419",
        "410", "420", "422",
    ),
    # Bad or stale timestamp: refused before processing; a fresh timestamp makes it safe to resend.
    Outcome.RETRY: ("151", "152"),
    # 115: this number's frequency limit. 409: the content's template is under manual review.
    # Neither is worth retrying at once; a later resume sends them.
    Outcome.DEFER: ("115", "409"),
}  # fmt: skip
CODE_CLASSES: Mapping[str, Outcome] = {code: kind for kind, codes in _CLASSES.items() for code in codes}

SPLIT_CODES = frozenset((*_CLASSES[Outcome.FAILED], "115"))
"""Per-recipient codes (PROTOCOLS.md §2.5), plus 115 (one number's frequency limit). As a
whole-request error (``{"status":"error","code":…}``, no ``batchlist``) nothing was sent, and
the code names no number: a call of several recipients is SPLIT (the engine sends its parts
until the recipients at fault stand alone), a recipient alone gets the code's class. multi*
answers report these per entry and need no split."""


def classify(code: str | None, http_status: int) -> Outcome:
    """The class of a SUBMAIL error ``code`` (``None``: an error without one).

    Unknown codes: on a 5xx the request may have been processed (UNKNOWN); a 429 is a
    throttle; anything else is taken as a whole-request refusal (FATAL), which stops the
    run and leaves the recipients pending, where FAILED could not be undone.
    """
    known = CODE_CLASSES.get(code) if code is not None else None
    if known is not None:
        return known
    if http_status >= 500:
        return Outcome.UNKNOWN
    if http_status == 429:
        return Outcome.THROTTLED
    return Outcome.FATAL


def _text(value: object) -> str | None:
    return value[:500] if isinstance(value, str) and value else None


def _loads(content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None


def _no_result(status: int, message: str | None = None) -> BatchOutcome:
    """No usable result. A 2xx or 5xx reached SUBMAIL and may have been processed."""
    if status == 429:
        kind = Outcome.THROTTLED
    elif 200 <= status < 300 or status >= 500:
        kind = Outcome.UNKNOWN
    else:
        kind = Outcome.FATAL
    return BatchOutcome(kind, code=f"HTTP{status}", message=message or "response without a SUBMAIL result")


# -- request helpers -----------------------------------------------------------------------------
def submail_phone(phone: str) -> str:
    """E.164 digits → SUBMAIL: 11 digits for mainland mobiles, else ``+<digits>``."""
    return phone[2:] if len(phone) == 13 and phone.startswith("861") else f"+{phone}"


def submail_text(sign_name: str, content: str) -> str:
    """The text as sent: SUBMAIL wants the signature first, in ``【…】``.

    Content that already starts with ``【`` is sent as is; otherwise ``【sign_name】`` leads.
    """
    if not sign_name or content.startswith("【"):
        return content
    return (sign_name if sign_name.startswith("【") else f"【{sign_name}】") + content


_VAR = re.compile(r"@var\(([^()]*)\)")


def _fill_vars(message: Message) -> str:
    """A multisend text as SUBMAIL renders it: ``@var(key)`` replaced by the recipient's var."""
    params = message.params
    return _VAR.sub(lambda g: params.get(g.group(1), g.group(0)), message.content or "")


def parse_timestamp(response: httpx.Response) -> float:
    """The server time from a ``/service/timestamp`` response (``{"timestamp": 1414253462}``).

    Raises :class:`SubmailError` on anything else.
    """
    data = _loads(response.content)
    ts = data.get("timestamp") if isinstance(data, dict) else None
    if isinstance(ts, str):
        try:
            ts = float(ts)
        except ValueError:
            ts = None
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts) or ts <= 0:
        raise SubmailError(f"HTTP{response.status_code}", "no timestamp in the response")
    return float(ts)


def parse_log(response: httpx.Response) -> list[dict[str, object]]:
    """The rows of an ``sms/log`` response (``data``: ``sendID``, ``to``, ``status``…).

    Raises :class:`SubmailError` for an error or unreadable response: "no rows" must never
    be confused with "the query failed", or a reconciliation would resend delivered messages.
    """
    data = _loads(response.content)
    if not isinstance(data, dict) or data.get("status") != "success" or not 200 <= response.status_code < 300:
        code = result_code(data.get("code")) if isinstance(data, dict) else None
        message = _text(data.get("msg")) if isinstance(data, dict) else None
        raise SubmailError(code or f"HTTP{response.status_code}", message or "sms/log did not succeed")
    rows = data.get("data")
    if rows is None:
        return []
    if not isinstance(rows, list):
        raise SubmailError(f"HTTP{response.status_code}", "sms/log data is not a list")
    return [row for row in rows if isinstance(row, dict)]


# -- the provider ---------------------------------------------------------------------------
class SubmailSms:
    """SUBMAIL ``sms/batchsend``, ``sms/multisend`` or ``sms/multixsend``."""

    name = "submail"
    max_text_length = 1000  # the content with its 【signature】 (PROTOCOLS.md §2.4, seed)

    @staticmethod
    def text_limit(mode: Mode, template_text: str | None = None) -> TextLimit:
        """batchsend: the content as sent; multisend: the content with ``@var(key)`` filled;
        multixsend: the project's text (``template_text``, ``${name}`` placeholders) when
        given, else only the signature and the vars, a lower bound."""
        limit = SubmailSms.max_text_length
        if mode == "batchsend":
            return TextLimit("submail", limit, lambda m: submail_text(m.sign_name, m.content or ""))
        if mode == "multisend":
            return TextLimit("submail", limit, lambda m: submail_text(m.sign_name, _fill_vars(m)))
        if template_text is None:
            return TextLimit("submail", limit, sign_and_params, whole=False)
        return TextLimit(
            "submail", limit, lambda m: submail_text(m.sign_name, fill_template(template_text, m.params))
        )

    def __init__(
        self,
        *,
        credentials: SubmailCredentials,
        mode: Mode = "batchsend",
        content: str | None = None,
        project: str | None = None,
        batch_size: int = 200,
        sign_type: SignType = "md5",
        sign_version: Literal[2] | None = 2,
        v2_excluded: Collection[str] | None = None,
        body_format: Literal["form", "json"] = "form",
        endpoint: str = DEFAULT_ENDPOINT,
        clock: Clock = time.time,
        sms_signature: str | None = None,
    ) -> None:
        """``content``: the ``multisend`` text with ``@var(key)`` placeholders; ``project``:
        the ``multixsend`` template id; ``sms_signature`` (multixsend only) overrides the
        template's signature. ``v2_excluded`` replaces :data:`SIGN_V2_EXCLUDED` for ``mode``."""
        if mode not in ("batchsend", "multisend", "multixsend"):
            raise ValueError(f"mode must be batchsend, multisend or multixsend, not {mode!r}")
        if sign_type not in ("normal", "md5", "sha1"):
            raise ValueError(f"sign_type must be normal, md5 or sha1, not {sign_type!r}")
        if sign_version not in (2, None):
            raise ValueError("sign_version must be 2 or None")
        if body_format not in ("form", "json"):
            raise ValueError("body_format must be form or json")
        if (mode == "multisend") != bool(content):
            raise ValueError("content (@var(key) placeholders) is for multisend, and required there")
        if (mode == "multixsend") != bool(project):
            raise ValueError("project is required for multixsend, and only there")
        if sms_signature and mode != "multixsend":
            raise ValueError("sms_signature applies to multixsend only")
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH}")
        url = httpx.URL(endpoint)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"endpoint must be an http(s) URL, not {endpoint!r}")
        self.mode: Mode = mode
        self.max_batch_size = batch_size
        self.content = content
        self.project = project
        self.sign_type: SignType = sign_type
        self._creds = credentials
        self._sign_version = sign_version
        self._path = f"sms/{mode}"
        self._exclude = frozenset(v2_excluded if v2_excluded is not None else SIGN_V2_EXCLUDED[self._path])
        self._json = body_format == "json"
        self._base = str(url).rstrip("/")
        self._clock = clock
        self._sms_signature = sms_signature
        self._offset: float | None = None
        self.offset_measured_at: float | None = None
        """Local time of the last :meth:`set_server_offset` (for the engine's refresh policy)."""

    # -- server time -------------------------------------------------------------------------
    @property
    def requires_server_time(self) -> bool:
        """True when requests carry a timestamp that SUBMAIL checks to within 6 s."""
        return self.sign_type != "normal"

    @property
    def server_offset(self) -> float | None:
        """Server clock minus local clock, in seconds; None until measured."""
        return self._offset

    def timestamp_request(self) -> httpx.Request:
        """``GET /service/timestamp`` (unsigned); read the answer with :func:`parse_timestamp`."""
        return httpx.Request("GET", f"{self._base}/service/timestamp", headers={"accept": "application/json"})

    def set_server_offset(self, server_ts: float, local_ts: float) -> None:
        """Record SUBMAIL's time ``server_ts`` as seen at local time ``local_ts``.

        Pass the local time halfway through the timestamp request. The server's value is
        whole seconds, rounded down, so the timestamps sent err on the past side.
        """
        if not (math.isfinite(server_ts) and math.isfinite(local_ts)):
            raise ValueError("timestamps must be finite")
        self._offset = server_ts - local_ts
        self.offset_measured_at = local_ts

    def timestamp(self) -> str:
        """The ``timestamp`` parameter now: whole seconds of ``clock() + offset``."""
        return str(int(self._clock() + (self._offset or 0.0)))

    # -- requests --------------------------------------------------------------------------------
    def batch_key(self, message: Message) -> Hashable:
        if self.mode == "batchsend":
            return submail_text(message.sign_name, message.content or "")
        if self.mode == "multisend" and not (self.content or "").startswith("【"):
            return message.sign_name  # the signature leads the shared text
        return self.mode

    def _signed(self, path: str, params: dict[str, str], exclude: Collection[str]) -> dict[str, str]:
        creds = self._creds
        if self.sign_type == "normal":
            params["signature"] = creds.appkey
            return params
        params["timestamp"] = self.timestamp()
        params["sign_type"] = self.sign_type
        if self._sign_version is not None and path != "sms/log":
            params["sign_version"] = str(self._sign_version)
        else:
            exclude = ()
        kind: Literal["md5", "sha1"] = "md5" if self.sign_type == "md5" else "sha1"
        params["signature"] = submail_signature(params, creds.appid, creds.appkey, kind, exclude)
        return params

    def _request(self, path: str, params: Mapping[str, str]) -> httpx.Request:
        if self._json:
            body, ctype = orjson.dumps(params), "application/json"
        else:
            # urlencode(params, quote_via=quote) byte for byte, each value encoded in one C pass
            # (multi* JSON of Chinese vars: urllib's quote is a Python loop per byte)
            body = "&".join([f"{percent_encode(k)}={percent_encode(v)}" for k, v in params.items()]).encode()
            ctype = _FORM
        headers = {"content-type": ctype, "accept": "application/json"}
        return httpx.Request("POST", f"{self._base}/{path}", headers=headers, content=body)

    def params(self, batch: Batch) -> dict[str, str]:
        """The signed parameters of ``batch``'s request (what :meth:`build_request` sends)."""
        messages = batch.messages
        params = {"appid": self._creds.appid}
        if self.mode == "batchsend":
            text = self._required_text(messages[0])
            if any(self._required_text(m) != text for m in messages[1:]):
                raise ValueError("a batchsend batch must share one text (group by batch_key)")
            params["to"] = ",".join([submail_phone(m.phone) for m in messages])
            params["content"] = text
        else:
            multi: list[dict[str, object]] = [{"to": submail_phone(m.phone)} for m in messages]
            for entry, m in zip(multi, messages, strict=True):
                if m.params:
                    entry["vars"] = m.params
            params["multi"] = orjson.dumps(multi).decode()
            if self.mode == "multisend":
                template = self.content or ""
                if not template.startswith("【") and len({m.sign_name for m in messages}) > 1:
                    raise ValueError("a multisend batch must share one signature (group by batch_key)")
                params["content"] = submail_text(messages[0].sign_name, template)
            else:
                params["project"] = self.project or ""
                if self._sms_signature:
                    params["sms_signature"] = self._sms_signature
        params = self._signed(self._path, params, self._exclude)
        if batch.out_id:
            params["tag"] = batch.out_id[:32]  # unsigned; echoed in every SUBHOOK event
        return params

    @staticmethod
    def _required_text(message: Message) -> str:
        if message.content is None:
            raise ValueError("SUBMAIL batchsend needs rendered content (a content template)")
        return submail_text(message.sign_name, message.content)

    def build_wire(self, batch: Batch) -> WireRequest:
        return WireRequest.from_httpx(self.build_request(batch))

    def build_request(self, batch: Batch) -> httpx.Request:
        """Signed now: send it at once (the signature is valid for 6 s)."""
        return self._request(self._path, self.params(batch))

    def log_request(
        self,
        *,
        to: str | None = None,
        send_id: str | None = None,
        sendlist: str | None = None,
        status: Literal["delivered", "dropped"] | None = None,
        start_date: int | None = None,
        end_date: int | None = None,
        rows: int | None = None,
        offset: int | None = None,
    ) -> httpx.Request:
        """A signed ``POST /sms/log`` (read it with :func:`parse_log`).

        SUBMAIL answers it **once per minute**; calls inside the minute get the previous
        (cached) answer, so the engine must rate-limit them. Dates are unix seconds (the
        default window is the last day); ``to`` is E.164 digits or already SUBMAIL's form.
        """
        params = {"appid": self._creds.appid}
        filters: dict[str, object] = {
            "to": submail_phone(to) if to and len(to) == 13 and to.startswith("861") else to,
            "send_id": send_id,
            "sendlist": sendlist,
            "status": status,
            "start_date": start_date,
            "end_date": end_date,
            "rows": rows,
            "offset": offset,
        }
        params.update({k: str(v) for k, v in filters.items() if v is not None})
        return self._request("sms/log", self._signed("sms/log", params, ()))

    # -- responses --------------------------------------------------------------------------------
    def parse_response(self, batch: Batch, response: Response) -> BatchOutcome:
        status = response.status_code
        data = _loads(response.content)
        if isinstance(data, list) and data:
            return self._per_recipient(batch, data, response, None, {})
        if not isinstance(data, dict):
            return _no_result(status)
        message = _text(data.get("msg"))
        if data.get("status") == "success":
            if not 200 <= status < 300:  # contradicts itself: may have been accepted
                return BatchOutcome(Outcome.UNKNOWN, code=f"HTTP{status}", message="success")
            batchlist = data.get("batchlist")
            provider_id = str(batchlist) if isinstance(batchlist, str | int) and batchlist != "" else None
            extra: dict[str, object] = {}
            if isinstance(data.get("total_fee"), int):
                extra["total_fee"] = data["total_fee"]
            responses = data.get("responses")
            if isinstance(responses, list) and responses:
                return self._per_recipient(batch, responses, response, provider_id, extra)
            return BatchOutcome(Outcome.SENT, provider_id=provider_id, extra=extra)
        if data.get("status") == "error":
            code = result_code(data.get("code"))
            kind = classify(code, status)
            if code in SPLIT_CODES and len(batch.messages) > 1:
                return BatchOutcome(Outcome.SPLIT, code=code, message=message, extra={"alone": kind})
            return BatchOutcome(
                kind,
                code=code or f"HTTP{status}",
                message=message,
                retry_after=retry_after_seconds(response.headers) if kind is Outcome.THROTTLED else None,
            )
        return _no_result(status, message)

    def _per_recipient(
        self,
        batch: Batch,
        entries: Sequence[object],
        response: Response,
        provider_id: str | None,
        extra: Mapping[str, object],
    ) -> BatchOutcome:
        """``entries``: a multi* array, or batchsend's ``responses``; matched by ``to``, else position."""
        matched = match_entries(entries, [submail_phone(m.phone) for m in batch.messages], _entry_to)
        recipients = [_entry_outcome(e, response.status_code) for e in matched]
        return summarize(
            recipients,
            provider_id=provider_id,
            extra=extra,
            retry_after=retry_after_seconds(response.headers),
        )


def _entry_to(entry: object) -> tuple[str, ...]:
    to = entry.get("to") if isinstance(entry, dict) else None
    return (to,) if isinstance(to, str) and to else ()


def _entry_outcome(entry: object, http_status: int) -> RecipientOutcome:
    if not isinstance(entry, dict):
        return RecipientOutcome(Outcome.UNKNOWN, code="NoResult")
    state = entry.get("status")
    if state == "success":
        send_id = entry.get("send_id")
        fee = entry.get("fee")
        return RecipientOutcome(
            Outcome.SENT,
            provider_id=send_id if isinstance(send_id, str) and send_id else None,
            fee=fee if isinstance(fee, int) and not isinstance(fee, bool) else None,
        )
    if state == "error":
        code = result_code(entry.get("code"))
        return RecipientOutcome(classify(code, http_status), code=code or f"HTTP{http_status}")
    return RecipientOutcome(Outcome.UNKNOWN, code="NoResult")


# -- declaration (providers/registry.py) -----------------------------------------------------
def _build(settings: ProviderSettings) -> SubmailSms:
    options, message = settings.options, settings.message
    mode: Mode = options.get("mode") or "batchsend"
    sign_type: SignType = options.get("sign_type") or "md5"
    return SubmailSms(
        credentials=SubmailCredentials.from_env(settings.environ),
        mode=mode,
        content=message.get("content") if mode == "multisend" else None,
        project=message.get("project") if mode == "multixsend" else None,
        batch_size=settings.batch_size,
        sign_type=sign_type,
        endpoint=settings.endpoint,
    )


def _check_message(options: Mapping[str, object], message: Mapping[str, object]) -> tuple[str, str] | None:
    mode = options.get("mode") or "batchsend"
    if mode in ("batchsend", "multisend") and not message.get("content"):
        return "message.content", "is required for submail"
    if mode == "multixsend" and not message.get("project"):
        return "message.project", "is required for submail multixsend"
    return None


def _time_request(provider: Provider) -> httpx.Request | None:
    assert isinstance(provider, SubmailSms)
    return provider.timestamp_request() if provider.requires_server_time else None


def _apply_time(provider: Provider, response: httpx.Response, local_midpoint: float) -> float | None:
    assert isinstance(provider, SubmailSms)
    provider.set_server_offset(parse_timestamp(response), local_midpoint)
    return provider.server_offset


async def _log_rows(provider: Provider, todo: Sequence[UnknownSend], fetch: Fetch) -> list[dict[str, Any]]:
    """Every ``sms/log`` row over the window of ``todo``'s sends (raises SubmailError,
    httpx.TransportError)."""
    assert isinstance(provider, SubmailSms)
    start = int(min(i.sent_at for i in todo)) - 60
    end = int(max(i.sent_at for i in todo)) + 3600
    out: list[dict[str, Any]] = []
    offset, rows = 0, 50
    while True:
        page = parse_log(
            await fetch(provider.log_request(start_date=start, end_date=end, rows=rows, offset=offset))
        )
        out.extend(page)
        if len(page) < rows:
            return out
        offset += rows


async def _sweep(provider: Provider, todo: Sequence[UnknownSend], fetch: Fetch) -> list[str]:
    """Page ``sms/log`` over the window of the unknown sends; a number found there was accepted."""
    if not todo:
        return []
    try:
        seen = {str(r.get("to", ""))[-11:] for r in await _log_rows(provider, todo, fetch)}
    except (SubmailError, httpx.TransportError) as exc:
        code = exc.code if isinstance(exc, SubmailError) else type(exc).__name__
        return [f"error:{code}"] * len(todo)
    return ["sent" if item.phone[-11:] in seen else "missing" for item in todo]


async def _delivery_sweep(
    provider: Provider, todo: Sequence[UnknownSend], fetch: Fetch
) -> list[tuple[str, str]]:
    """One ``sms/log`` sweep read for delivery, matched by number (INFERENCE: no send_id filter)."""
    if not todo:
        return []
    try:
        rows = await _log_rows(provider, todo, fetch)
    except (SubmailError, httpx.TransportError) as exc:
        code = exc.code if isinstance(exc, SubmailError) else type(exc).__name__
        return [("error", str(code))] * len(todo)
    final = {str(r.get("to", ""))[-11:]: r for r in rows if r.get("status") in ("delivered", "dropped")}
    out: list[tuple[str, str]] = []
    for item in todo:
        found = final.get(item.phone[-11:])
        if found is None:
            out.append(("waiting", ""))
        elif found["status"] == "delivered":
            out.append(("delivered", str(found.get("report_state") or "DELIVRD")))
        else:
            reason = found.get("report_state") or found.get("dropped_reason") or "dropped"
            out.append(("undelivered", str(reason)))
    return out


SPEC = ProviderKind(
    kind="submail",
    build=_build,
    env=(EnvVar("SUBMAIL_APPID"), EnvVar("SUBMAIL_APPKEY", secret=True)),
    default_endpoint=DEFAULT_ENDPOINT,
    max_batch=MAX_BATCH,
    config=(
        ConfigKey("mode", str, ("batchsend", "multisend", "multixsend"), "batchsend"),
        ConfigKey("sign_type", str, ("md5", "sha1", "normal"), "md5"),
    ),
    check_message=_check_message,
    test_env={"SUBMAIL_APPID": "10001", "SUBMAIL_APPKEY": "abcdef0123456789abcdef0123456789"},
    clock_sync=ClockSync(request=_time_request, apply=_apply_time),
    # SUBMAIL answers sms/log once a minute
    reconcile=ReconcileQuery(
        sweep=_sweep, delivery_sweep=_delivery_sweep, queries_per_second=1 / 60
    ),
    text_limit=lambda options, message: SubmailSms.text_limit(
        options.get("mode") or "batchsend", message.get("template_text")
    ),
    receipts=submail_receipts.PUSH,
)
