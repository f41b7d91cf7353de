"""Aliyun ``SmsReport`` pushes (PROTOCOLS.md §1.9), for text and card SMS alike.

The platform POSTs a JSON array of reports ``{phone_number, send_time, report_time, success,
err_code, err_msg, sms_size, biz_id, out_id}`` (times ``yyyy-MM-dd HH:mm:ss`` in UTC+8) and
stops retrying on HTTP 200 with ``{"code":0,"msg":"…"}``. A report names its batch by
``out_id`` (the OutId sluice sent) and ``biz_id`` (the BizId the send answered); its phone
picks the recipient in that batch. Sans-I/O.
"""

from __future__ import annotations

import orjson

from providers.push_fields import beijing_time, text
from providers.spec import BadReceipt, PushRequest, Receipt, ReceiptPush

__all__ = ("PUSH", "parse_sms_report")

NAME = "aliyun"
ANSWER = orjson.dumps({"code": 0, "msg": "成功"})


def parse_sms_report(body: bytes) -> list[Receipt]:
    """A ``SmsReport`` body: one receipt per report, in order."""
    try:
        items = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadReceipt(f"not JSON: {exc}") from None
    if not isinstance(items, list) or not items:
        raise BadReceipt("SmsReport is a non-empty JSON array")
    out = []
    for item in items:
        if not isinstance(item, dict) or not item.get("phone_number") or "success" not in item:
            raise BadReceipt("each report needs phone_number and success")
        ok = item["success"] in (True, "true", 1)
        biz_id = text(item.get("biz_id"))
        out.append(
            Receipt(
                NAME,
                text(item["phone_number"]),
                ok,
                text(item.get("err_code")) or ("DELIVERED" if ok else "UNKNOWN"),
                beijing_time(item.get("report_time")),
                provider_id=biz_id,
                batch_ref=text(item.get("out_id")),
                batch_id=biz_id,
            )
        )
    return out


def _parse(request: PushRequest, key: str | None) -> list[Receipt]:
    return parse_sms_report(request.body)  # unsigned: the secret path token guards it


PUSH = ReceiptPush(path=NAME, parse=_parse, answer=ANSWER, answer_type="application/json")
