"""structlog set-up: JSON lines, secrets redacted, phone numbers masked.

Events are per batch and per state change, never per recipient.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any, BinaryIO

import orjson
import structlog

from providers.spec import MIN_SECRET_LENGTH

__all__ = ("Redactor", "configure_logging", "mask_phone")

_PHONE = re.compile(r"\+?\d{7,15}")


def mask_phone(text: str) -> str:
    """``8613812345678`` → ``*********5678``."""
    return _PHONE.sub(lambda m: "*" * (len(m.group()) - 4) + m.group()[-4:], text)


class Redactor:
    """A processor removing secrets and masking phone numbers in every string.

    A secret is masked where a string equals it and, when it is at least
    ``MIN_SECRET_LENGTH`` characters long, wherever it occurs inside one. A shorter value
    (refused as a credential at start) is never searched for inside text: a one-character
    "secret" would otherwise mangle every word holding that character.
    """

    __slots__ = ("_exact", "_inside")

    def __init__(self, secrets: Iterable[str]) -> None:
        values = {v for s in secrets for v in (s, s.strip()) if v}
        self._exact = frozenset(values)
        # longest first, so a secret holding another is masked whole
        self._inside = tuple(
            sorted((v for v in values if len(v) >= MIN_SECRET_LENGTH), key=len, reverse=True)
        )

    def _clean(self, value: object) -> object:
        if isinstance(value, str):
            if value in self._exact:
                return "[redacted]"
            for s in self._inside:
                if s in value:
                    value = value.replace(s, "[redacted]")
            return mask_phone(value)
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(v) for v in value]
        return value

    def __call__(
        self, logger: object, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for k, v in event.items():
            if isinstance(v, str | dict | list | tuple):
                event[k] = self._clean(v)
        return event


_fault_listeners: list[Callable[[OSError, str], None]] = []


@contextlib.contextmanager
def on_log_fault(listener: Callable[[OSError, str], None]) -> Iterator[None]:
    """Call ``listener(error, file name)`` while inside, when a log line cannot be written."""
    _fault_listeners.append(listener)
    try:
        yield
    finally:
        _fault_listeners.remove(listener)


class _Tee:
    """A structlog logger writing each rendered line to several binary files. A file that
    cannot be written (disk full) loses the line, and the listeners hear of it: logging
    never raises into the code that logs."""

    def __init__(self, targets: list[BinaryIO]) -> None:
        self._targets = targets

    def msg(self, message: bytes) -> None:
        for t in self._targets:
            try:
                t.write(message + b"\n")
                t.flush()
            except OSError as exc:
                for listener in _fault_listeners:
                    listener(exc, str(getattr(t, "name", "log")))

    info = debug = warning = error = critical = exception = msg


def configure_logging(
    log_file: BinaryIO | None,
    *,
    secrets: Iterable[str] = (),
    echo: bool = False,
    level: str = "info",
) -> None:
    """Send events to ``log_file`` (and stderr when ``echo``), as JSON lines."""
    targets: list[BinaryIO] = []
    if log_file is not None:
        targets.append(log_file)
    if echo:
        targets.append(sys.stderr.buffer)
    tee = _Tee(targets)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            Redactor(secrets),
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *args: tee,
        cache_logger_on_first_use=False,
    )
