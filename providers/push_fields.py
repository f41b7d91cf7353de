"""Reading the fields of pushed receipts: form bodies and the providers' UTC+8 times."""

from __future__ import annotations

import calendar
import functools
import time
from urllib.parse import parse_qsl

from providers.spec import BadReceipt

__all__ = ("beijing_time", "form_fields", "text")

BEIJING = 8 * 3600


def form_fields(body: bytes) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (a repeated field: its last value)."""
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    except UnicodeDecodeError:
        raise BadReceipt("form body is not UTF-8") from None


def beijing_time(value: object) -> float | None:
    """``yyyy-MM-dd HH:mm:ss`` in UTC+8 → epoch seconds; None when absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    return _parse_beijing(value)


@functools.lru_cache(maxsize=4096)  # a push's reports share a few seconds: strptime is ~10 µs
def _parse_beijing(value: str) -> float | None:
    try:
        return calendar.timegm(time.strptime(value[:19], "%Y-%m-%d %H:%M:%S")) - BEIJING
    except ValueError:
        return None


def text(value: object) -> str:
    """A JSON value as text ('' for null)."""
    return "" if value is None else str(value)
