"""Render: turn a source row into a :class:`~providers.base.Message` or a rejection.

Templates are deliberately tiny: ``"Hello {first_name}"`` may name a column and
nothing else. ``{{`` and ``}}`` are literal braces. Attribute access, indexing
and format specs (everything ``str.format`` would allow) are refused when the
campaign is loaded, so untrusted rows can never reach an object's internals.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import compress
from typing import TYPE_CHECKING, Any

import phonenumbers

from providers import registry
from providers.base import Message, TextLimit

if TYPE_CHECKING:
    from pipeline.app.campaign import Campaign, LimitsSpec

__all__ = (
    "Rejection",
    "Renderer",
    "Template",
    "TemplateError",
    "campaign_text_limit",
    "mobile_problem",
    "normalize_phone",
    "reason_group",
    "rejects_over_limit",
)

_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Mainland mobile numbers (national, 11 digits) exactly as libphonenumber has them: numbers it
# calls MOBILE for CN; tests/test_checks.py checks the two agree number by number.
_CN_METADATA = phonenumbers.PhoneMetadata.metadata_for_region("CN")
assert _CN_METADATA is not None and _CN_METADATA.mobile is not None
assert _CN_METADATA.mobile.national_number_pattern is not None
# [0-9] for \d: the same on the ASCII digits matched here, and 1.7x faster than Unicode's \d.
_CN_MOBILE_PATTERN = _CN_METADATA.mobile.national_number_pattern.replace("\\d", "[0-9]")
_CN_MOBILE = re.compile(f"(?:{_CN_MOBILE_PATTERN})\\Z")
_MOBILES = re.compile(f"(?:{_CN_MOBILE_PATTERN})*")  # bare mainland mobile numbers, back to back
_FLIP = bytes.maketrans(b"\x00\x01", b"\x01\x00")  # a mask's 0s and 1s swapped
_MOBILE_TYPES = frozenset(
    {phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE}
)
_TOO_LONG = re.compile(r"text is [0-9 ]+ characters; (.+) allows ([0-9 ]+)\Z")


class TemplateError(ValueError):
    """A template placeholder is malformed or reaches beyond a column name."""


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled template: literal text interleaved with column names."""

    source: str
    parts: tuple[str, ...]  # even indexes: literals; odd indexes: column names

    @classmethod
    def compile(cls, text: str) -> Template:
        parts: list[str] = []
        literal: list[str] = []
        pos = 0
        for m in _FIELD.finditer(text):
            literal.append(text[pos : m.start()])
            token = m.group(0)
            if token in ("{{", "}}"):
                literal.append(token[0])
            elif token in ("{", "}"):
                raise TemplateError(f"unmatched {token!r} in {text!r} (write {token * 2} for a brace)")
            else:
                name = m.group(1).strip()
                if not _NAME.match(name):
                    raise TemplateError(
                        f"placeholder {{{m.group(1)}}} in {text!r} must be a plain column name"
                    )
                parts.append("".join(literal))
                parts.append(name)
                literal = []
            pos = m.end()
        literal.append(text[pos:])
        parts.append("".join(literal))
        return cls(text, tuple(parts))

    @property
    def columns(self) -> tuple[str, ...]:
        return self.parts[1::2]

    def render(self, row: Mapping[str, object]) -> str:
        """Fill the template; raises KeyError naming the first missing column."""
        parts = self.parts
        if len(parts) == 1:
            return parts[0]
        if len(parts) == 3 and not parts[0] and not parts[2]:
            return _text(row, parts[1])
        out = [parts[0]]
        for i in range(1, len(parts), 2):
            out.append(_text(row, parts[i]))
            out.append(parts[i + 1])
        return "".join(out)


def _text(row: Mapping[str, object], column: str) -> str:
    value = row.get(column)
    if value is None or value == "":
        raise KeyError(column)
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    raise TypeError(column)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A row that will never be sent, with the reason written to the ledger."""

    row: int
    key: str
    reason: str


_PHONE_JUNK = str.maketrans("", "", " -().\t")


def normalize_phone(raw: str, default_country: str = "86") -> str | None:
    """Return E.164 digits without ``+`` (``8613800000000``), or None if invalid.

    Accepts ``+CC…``, ``00CC…``, mainland China numbers bare or with ``86`` /
    ``+86`` / ``0086``, and national numbers of ``default_country`` when it is
    ``86``. Everything else must carry its country code.
    """
    s = raw.strip().translate(_PHONE_JUNK)
    international = s.startswith(("+", "00"))
    s = s[1:] if s.startswith("+") else s[2:] if international else s
    if not s.isdigit() or not s.isascii():
        return None
    if not international and default_country == "86" and s[0] == "1":
        if len(s) != 11:
            return None  # a mainland mobile number with a digit too many or too few
        s = "86" + s
    if s.startswith("86") and len(s) != 13 and s[2:3] == "1":
        return None
    if s.startswith("861") and (len(s) != 13 or s[3] not in "3456789"):
        return None
    if not 8 <= len(s) <= 15 or s[0] == "0":
        return None
    return s


def mobile_problem(phone: str) -> str | None:
    """None when ``phone`` (E.164 digits) is a mobile number of its country, as libphonenumber
    has it (MOBILE, or FIXED_LINE_OR_MOBILE where a country's numbers do not tell); else why not.

    Mainland numbers are matched against libphonenumber's own CN mobile pattern (~0.3 µs: its
    MOBILE type is that pattern: no other CN type matches its numbers); other numbers are parsed
    and typed by ``phonenumbers`` (~30 µs).
    """
    if phone.startswith("86"):  # calling codes are prefix-free: this is China
        return None if _CN_MOBILE.match(phone, 2) else "not a mobile number for CN"
    try:
        number = phonenumbers.parse("+" + phone)
    except phonenumbers.NumberParseException as exc:
        if exc.error_type == phonenumbers.NumberParseException.INVALID_COUNTRY_CODE:
            return "no country has this calling code"
        return "not a mobile number"
    if phonenumbers.number_type(number) in _MOBILE_TYPES:
        return None
    region = phonenumbers.region_code_for_number(number)
    if region is None:
        region = phonenumbers.region_code_for_country_code(number.country_code or 0)
    return f"not a mobile number for {region}"


def campaign_text_limit(campaign: Campaign) -> TextLimit | None:
    """The campaign's provider's text limit, for the render stage (None: nothing to check)."""
    spec = registry.lookup(registry.protocol_of(campaign.provider.kind, campaign.provider.protocol))
    if spec is None:
        return None
    options = {**{key.name: key.default for key in spec.config}, **campaign.provider.settings()}
    return spec.text_limit(options, dataclasses.asdict(campaign.message))


def reason_group(reason: str) -> str:
    """A rejection reason without its row's particulars, for counting (``--dry-run``)."""
    m = _TOO_LONG.match(reason)
    return f"text longer than {m[1]} allows ({m[2]} characters)" if m else reason


class Renderer:
    """Renders rows of one campaign: the phone, the sign name and the parameters."""

    __slots__ = (
        "_columns_only",
        "_content",
        "_content_columns",
        "_content_format",
        "_country",
        "_limit",
        "_params",
        "_params_compiled",
        "_phone",
        "_sign",
    )

    def __init__(
        self,
        *,
        phone_column: str,
        sign_name: Template,
        params: Mapping[str, Template],
        content: Template | None = None,
        default_country: str = "86",
        text_limit: TextLimit | None = None,
    ) -> None:
        """``text_limit``: the provider's (see :func:`campaign_text_limit`); longer texts are rejected."""
        self._phone = phone_column
        self._sign = sign_name
        self._params = tuple(params.items())
        # (name, column, template): column set when the template is exactly one column
        self._params_compiled = tuple(
            (name, t.parts[1] if len(t.parts) == 3 and not t.parts[0] and not t.parts[2] else "", t)
            for name, t in params.items()
        )
        self._content = content
        self._country = default_country
        self._limit = text_limit
        # The common campaign, rendered by render_rows without a call per row: a literal
        # sign name with clean text, every parameter exactly one column, free text (if any)
        # with clean literals between its columns.
        literal_sign = len(sign_name.parts) == 1 and "\x00" not in sign_name.parts[0]
        self._columns_only: tuple[tuple[str, str], ...] | None = None
        self._content_columns: tuple[str, ...] = ()
        self._content_format = ""  # the content as a str.format pattern of its columns, in order
        literals = "".join(content.parts[0::2]) if content is not None else ""
        if (
            literal_sign
            and _clean(sign_name.parts[0])
            and "\x00" not in literals
            and _clean(literals)
            and all(column for _, column, _ in self._params_compiled)
            and default_country == "86"
        ):
            self._columns_only = tuple((name, column) for name, column, _ in self._params_compiled)
            if content is not None:
                self._content_columns = content.columns
                self._content_format = "{}".join(
                    p.replace("{", "{{").replace("}", "}}") for p in content.parts[0::2]
                )

    @property
    def columns(self) -> set[str]:
        """Every column the campaign reads (for checking a CSV header up front)."""
        cols = {self._phone, *self._sign.columns}
        for _, t in self._params:
            cols.update(t.columns)
        if self._content is not None:
            cols.update(self._content.columns)
        return cols

    def render(self, row: int, key: str, record: Mapping[str, object]) -> Message | Rejection:
        raw = record.get(self._phone)
        if (
            type(raw) is str
            and len(raw) == 11
            and raw[0] == "1"
            and raw.isascii()
            and _CN_MOBILE.match(raw)
            and self._country == "86"
        ):
            phone: str | None = "86" + raw  # the common case: a bare mainland mobile number
            problem = None
        elif raw is None or raw == "":
            return Rejection(row, key, f"missing column {self._phone!r}")
        elif not isinstance(raw, str | int) or isinstance(raw, bool):
            return Rejection(row, key, f"column {self._phone!r} is not a phone number")
        else:
            phone = normalize_phone(str(raw), self._country)
            problem = None if phone is None else mobile_problem(phone)
        if phone is None:
            return Rejection(row, key, f"invalid phone number in column {self._phone!r}")
        if problem is not None:
            if self._country == "86" and not phone.startswith("86") and str(raw).strip()[:1].isdigit():
                problem += " (read with its country code: a bare number is mainland when it starts with 1)"
            return Rejection(row, key, problem)
        try:
            sign = self._sign.render(record)
            params = {}
            for name, column, template in self._params_compiled:
                value = record.get(column) if column else None
                if type(value) is not str or not value:
                    value = template.render(record)  # literal, composite, number, or missing
                params[name] = value
            content = None if self._content is None else self._content.render(record)
        except KeyError as exc:
            return Rejection(row, key, f"missing column {exc.args[0]!r}")
        except TypeError as exc:
            return Rejection(row, key, f"column {exc.args[0]!r} is not text or a number")
        text = sign + "".join(params.values()) + (content or "")
        if "\x00" in text:
            return Rejection(row, key, "NUL byte in a field")
        if not text.isascii() and not _clean(text):
            return Rejection(row, key, "invalid UTF-8 or control characters in a field")
        message = Message(row, key, phone, params, sign, content)
        if self._limit is not None and (problem := self._limit.problem(message)) is not None:
            return Rejection(row, key, problem)
        return message

    def render_rows(
        self, items: Iterable[tuple[int, str, Mapping[str, object]]]
    ) -> tuple[list[Message], list[tuple[int, str, str]]]:
        """:meth:`render` over many rows: the messages, and (row, key, reason) for the rejected.

        Rows of the common shape (a bare mainland mobile number, every parameter a
        non-empty ASCII column value) take an inline path; any other row goes through
        :meth:`render`, so both give the same result for every row.
        """
        messages: list[Message] = []
        rejects: list[tuple[int, str, str]] = []
        if not isinstance(items, list):
            items = list(items)
        columns = self._columns_only
        if columns is not None:
            phone_column = self._phone
            rows = [row for row, _, _ in items]
            keys = [key for _, key, _ in items]
            raws = [record.get(phone_column) for _, _, record in items]
            values = [
                [record.get(column) for _, _, record in items]
                for column in (*(c for _, c in columns), *self._content_columns)
            ]
            fast = self._render_common(rows, keys, raws, values)
            if fast is None:
                fast = self._render_mostly_common(rows, keys, raws, values, lambda i: items[i][2], rejects)
            if fast is not None:
                return fast, rejects
        for row, key, record in items:
            m = self.render(row, key, record)
            if isinstance(m, Rejection):
                rejects.append((m.row, m.key, m.reason))
            else:
                messages.append(m)
        return messages, rejects

    def render_columns(
        self,
        rows: Sequence[int],
        keys: Sequence[str],
        header: Sequence[str],
        values: Sequence[Sequence[str]],
        rejects: list[tuple[int, str, str]] | None = None,
    ) -> list[Message] | None:
        """Render rows given as columns (``values[i]`` holds column ``header[i]``), when every
        row is of the common shape; None when any is not (render them one by one then).

        With ``rejects``, rows whose number is not a bare mainland mobile (a few bad numbers)
        are rendered one by one and their rejections appended there; the rest still must be
        of the common shape."""
        columns = self._columns_only
        if columns is None:
            return None
        index = {name: i for i, name in enumerate(header)}  # the last of a name, as a dict has it
        at = [
            index.get(self._phone),
            *(index.get(column) for _, column in columns),
            *(index.get(column) for column in self._content_columns),
        ]
        if None in at:
            return None
        raws, params = values[at[0]], [values[i] for i in at[1:]]  # type: ignore[index]
        out = self._render_common(rows, keys, raws, params)
        if out is None and rejects is not None:

            def record(i: int) -> dict[str, str]:
                return dict(zip(header, (column[i] for column in values), strict=True))

            out = self._render_mostly_common(rows, keys, raws, params, record, rejects)
        return out

    def _render_mostly_common(
        self,
        rows: Sequence[int],
        keys: Sequence[str],
        raws: Sequence[Any],
        values: Sequence[Sequence[Any]],
        record: Callable[[int], Mapping[str, object]],
        rejects: list[tuple[int, str, str]],
    ) -> list[Message] | None:
        """A chunk where a few numbers are not bare mainland mobiles (1 % bad numbers puts one
        in most chunks): the other rows inline, those one by one (``record(i)``: row ``i``),
        their rejections appended to ``rejects``. None, with nothing appended, when the other
        rows are not all of the common shape either, or the odd rows are not a few."""
        mask = _mobile_mask(raws)
        if not len(raws) // 2 <= mask.count(1) < len(raws):
            return None
        inline = self._render_common(
            list(compress(rows, mask)),
            list(compress(keys, mask)),
            list(compress(raws, mask)),
            [list(compress(column, mask)) for column in values],
        )
        if inline is None:
            return None
        out: list[Message] = []
        done = 0  # inline messages placed so far
        for odd, i in enumerate(compress(range(len(raws)), mask.translate(_FLIP))):
            out += inline[done : i - odd]  # the inline rows before row i
            done = i - odd
            one = self.render(rows[i], keys[i], record(i))
            if isinstance(one, Rejection):
                rejects.append((one.row, one.key, one.reason))
            else:
                out.append(one)
        out += inline[done:]
        return out

    def _render_common(
        self,
        rows: Sequence[int],
        keys: Sequence[str],
        raws: Sequence[Any],
        values: Sequence[Sequence[Any]],
    ) -> list[Message] | None:
        """Every row at once when all are of the common shape (checked column by column,
        in C-speed passes over the whole chunk); None when any row is not."""
        assert self._columns_only is not None
        try:
            phones = "".join(raws)
            texts = ["".join(v) for v in values]
        except TypeError:  # a missing column or a number somewhere
            return None
        if not (
            phones.isascii()
            and set(map(len, raws)) <= {11}
            and _MOBILES.fullmatch(phones)
            and all("\x00" not in t and (t.isascii() or _clean(t)) for t in texts)
            and all("" not in v for v in values)
        ):
            return None
        sign = self._sign.parts[0]
        names = [name for name, _ in self._columns_only]
        values, content_values = values[: len(names)], values[len(names) :]
        content = self._content
        if self._limit is not None:  # the longest value of each column: no row can be longer
            longest = {n: "x" * max(map(len, v), default=0) for n, v in zip(names, values, strict=True)}
            longest_content = None
            if content is not None:
                columns = zip(content.columns, content_values, strict=True)
                widest = {c: "x" * max(map(len, v), default=1) for c, v in columns}
                longest_content = content.render(widest)
            if self._limit.problem(Message(0, "", "", longest, sign, longest_content)) is not None:
                return None  # some row may be too long: row by row
        if content is not None:
            contents = (
                list(map(self._content_format.format, *content_values))
                if content_values
                else [content.parts[0]] * len(rows)
            )
            if not names:  # free text only (NXCloud, SUBMAIL batchsend)
                return [
                    Message(r, k, "86" + p, {}, sign, c)
                    for r, k, p, c in zip(rows, keys, raws, contents, strict=True)
                ]
            by_row = zip(*values, strict=True)
            return [
                Message(r, k, "86" + p, dict(zip(names, params, strict=True)), sign, c)
                for r, k, p, params, c in zip(rows, keys, raws, by_row, contents, strict=True)
            ]
        # A dict display per row is 3x cheaper than dict(zip(...)): spelled out for up to 3.
        if len(names) == 1:
            (n0,) = names
            return [
                Message(r, k, "86" + p, {n0: a}, sign)
                for r, k, p, a in zip(rows, keys, raws, *values, strict=True)
            ]
        if len(names) == 2:
            n0, n1 = names
            return [
                Message(r, k, "86" + p, {n0: a, n1: b}, sign)
                for r, k, p, a, b in zip(rows, keys, raws, *values, strict=True)
            ]
        if len(names) == 3:
            n0, n1, n2 = names
            return [
                Message(r, k, "86" + p, {n0: a, n1: b, n2: c}, sign)
                for r, k, p, a, b, c in zip(rows, keys, raws, *values, strict=True)
            ]
        rows_params = zip(*values, strict=True) if values else [()] * len(rows)
        return [
            Message(r, k, "86" + p, dict(zip(names, params, strict=True)), sign)
            for r, k, p, params in zip(rows, keys, raws, rows_params, strict=True)
        ]


def _mobile_mask(raws: Sequence[Any]) -> bytearray:
    """1 for each value that is a bare mainland mobile number, else 0. A chunk of 11-character
    strings is scanned in one string by the back-to-back pattern, which stops at each odd one."""
    phones: str | None
    try:
        phones = "".join(raws)
    except TypeError:  # a value that is not text
        phones = None
    if phones is None or not phones.isascii() or set(map(len, raws)) != {11}:
        return bytearray(type(raw) is str and _CN_MOBILE.match(raw) is not None for raw in raws)
    mask = bytearray(b"\x01") * len(raws)
    pos = 0
    while pos < len(phones):
        matched = _MOBILES.match(phones, pos)
        assert matched is not None  # (…)* matches, if only the empty string
        pos = matched.end()
        if pos < len(phones):
            mask[pos // 11] = 0
            pos += 11
    return mask


def _clean(value: str) -> bool:
    """False for text holding undecodable bytes (surrogate escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def rejects_over_limit(rejected: int, read: int, limits: LimitsSpec) -> str | None:
    """Why the run stops when more than ``limits.max_reject_ratio`` of the rows read so far were
    rejected (checked after every chunk, the first included), else None."""
    if limits.max_reject_ratio >= 1 or read == 0 or rejected <= limits.max_reject_ratio * read:
        return None
    return (
        f"{rejected:,} of the first {read:,} rows were rejected, more than limits.max_reject_ratio = "
        f"{limits.max_reject_ratio:g}: is it the right file? `sluice export` lists them with their reasons; "
        "fix the file and start a new run (or raise the limit)"
    )
