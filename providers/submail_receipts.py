"""SUBMAIL SUBHOOK pushes (PROTOCOLS.md §2.6): one event per POST, a form or JSON.

Events: ``request``, ``delivered``, ``dropped`` (carries ``report``), ``sending``, ``unknown``,
``mo``, ``template_accept``, ``template_reject``; ``delivered``, ``dropped`` and ``unknown``
settle a message, the others are answered and ignored. Each event carries ``send_id``,
``address``, ``app``, ``tag``, ``timestamp``, ``token`` and ``signature`` = md5(``token`` +
the SUBHOOK key). ``tag`` is the batch's out_id cut to 32 characters (the seed: "32 个字符以内",
echoed in every SUBHOOK event), ``address`` the number in it. Answered ``success``. Sans-I/O.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

import orjson

from providers.push_fields import form_fields
from providers.spec import BadReceipt, BadSignature, PushRequest, Receipt, ReceiptPush

__all__ = ("FINAL_EVENTS", "KEY_ENV", "PUSH", "parse_event", "read_event", "signature_ok")

NAME = "submail"
KEY_ENV = "SUBMAIL_SUBHOOK_KEY"
TAG_CHARS = 32
FINAL_EVENTS = frozenset({"delivered", "dropped", "unknown"})


def read_event(request: PushRequest) -> dict[str, str]:
    """The event's fields, from a JSON object or a form body."""
    if request.content_type != "application/json":
        return form_fields(request.body)
    try:
        data = orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise BadReceipt(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadReceipt("a SUBHOOK event is an object")
    return {k: str(v) for k, v in data.items()}


def signature_ok(event: Mapping[str, str], key: str) -> bool:
    """md5(token + key) == signature."""
    expected = hashlib.md5((event.get("token", "") + key).encode()).hexdigest()
    signature = event.get("signature", "")
    return bool(signature) and hmac.compare_digest(expected, signature.lower())


def parse_event(event: Mapping[str, str]) -> Receipt | None:
    """A verified event's receipt; None for an event that settles no message."""
    kind = event.get("events") or event.get("event") or ""
    if not kind:
        raise BadReceipt("SUBHOOK event without 'events'")
    if kind not in FINAL_EVENTS:
        return None
    if not event.get("address") or not event.get("send_id"):
        raise BadReceipt("SUBHOOK event needs send_id and address")
    delivered = kind == "delivered"
    code = event.get("report") or event.get("dropped_reason") or ("DELIVRD" if delivered else kind.upper())
    try:
        at: float | None = float(event.get("timestamp", ""))
    except ValueError:
        at = None
    return Receipt(
        NAME,
        event["address"],
        delivered,
        code,
        at,
        provider_id=event["send_id"],
        batch_ref=event.get("tag", ""),
    )


def _parse(request: PushRequest, key: str | None) -> list[Receipt]:
    event = read_event(request)
    if key is None or not signature_ok(event, key):
        raise BadSignature("bad signature")
    receipt = parse_event(event)
    return [] if receipt is None else [receipt]


PUSH = ReceiptPush(
    path=NAME,
    parse=_parse,
    answer=b"success",
    answer_type="text/plain; charset=utf-8",
    key_env=KEY_ENV,
    batch_ref_chars=TAG_CHARS,
)
