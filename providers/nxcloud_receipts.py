"""NXCloud DR pushes (PROTOCOLS.md §3.6): one report per request, answered ``success``.

Sent to ``drUrl`` or the app's DR URL as a form POST; accounts registered before May 2023
get the fields in the query string instead (so any method is taken). Fields: ``phone``,
``messageid``, ``status`` (2 = DELIVRD; 5 UNDELIV, 6 REJECTD, 7 EXPIRED, ...), ``result``,
``drtime`` and ``sendtime`` (``yyyy-MM-dd HH:mm:ss``, UTC+8), ``size``, ``price``,
``currency``, ``rate``, ``ext``. ``messageid`` is the ``sysMessageId`` sluice sent for the
recipient (:func:`providers.nxcloud.message_id`). Sans-I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

from providers.push_fields import beijing_time, form_fields
from providers.spec import BadReceipt, PushRequest, Receipt, ReceiptPush

__all__ = ("DELIVERED", "PUSH", "parse_dr")

NAME = "nxcloud"
DELIVERED = "2"


def parse_dr(fields: Mapping[str, str]) -> Receipt:
    """A DR's receipt."""
    if not fields.get("messageid") or not fields.get("status"):
        raise BadReceipt("DR needs messageid and status")
    return Receipt(
        NAME,
        fields.get("phone", ""),
        fields["status"] == DELIVERED,
        fields.get("result") or f"status{fields['status']}",
        beijing_time(fields.get("drtime")),
        provider_id=fields["messageid"],
        message_id=fields["messageid"],
    )


def _parse(request: PushRequest, key: str | None) -> list[Receipt]:
    fields = form_fields(request.body) if request.body else dict(request.query)
    return [parse_dr(fields)]  # unsigned: the secret path token guards it


PUSH = ReceiptPush(
    path=NAME,
    parse=_parse,
    answer=b"success",
    answer_type="text/plain; charset=utf-8",
    methods=None,  # a form POST, or the query string of any request
)
