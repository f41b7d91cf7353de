"""Aliyun credentials and request signing (RPC V2 HMAC-SHA1, ACS3 V3 HMAC-SHA256). Sans-I/O.

Shared by the send clients (aliyun.py, aliyun_card.py), the status queries (aliyun_query.py)
and the simulator's verifiers (providers/simulator/aliyun_verify.py). Facts: PROTOCOLS.md §1.3-1.5.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from providers.base import CredentialsError

__all__ = (
    "API_VERSION",
    "DEFAULT_ENDPOINT",
    "TEST_CREDENTIALS",
    "V3_ALGORITHM",
    "AliyunCredentials",
    "CredentialsError",
    "percent_encode",
    "rpc_signature",
    "rpc_string_to_sign",
    "v3_canonical_request",
    "v3_sign_headers",
    "v3_signature",
)

API_VERSION = "2017-05-25"
DEFAULT_ENDPOINT = "https://dysmsapi.aliyuncs.com"
V3_ALGORITHM = "ACS3-HMAC-SHA256"


# -- credentials --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AliyunCredentials:
    access_key_id: str
    access_key_secret: str = field(repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> AliyunCredentials:
        """Read ``ALIYUN_ACCESS_KEY_ID`` and ``ALIYUN_ACCESS_KEY_SECRET``."""
        names = ("ALIYUN_ACCESS_KEY_ID", "ALIYUN_ACCESS_KEY_SECRET")
        values = [environ.get(name, "").strip() for name in names]
        missing = [name for name, value in zip(names, values, strict=True) if not value]
        if missing:
            raise CredentialsError(
                f"Aliyun credentials: {' and '.join(missing)} not set (or empty) in the environment"
            )
        return cls(values[0], values[1])


TEST_CREDENTIALS = AliyunCredentials("testid", "testsecret")
"""The documented test credentials; the official SDK captures are signed with them."""


# -- percent-encoding ---------------------------------------------------------------------
_UNRESERVED = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~"
_ESCAPES = [(bytes([c]), b"%%%02X" % c) for c in range(128)]
_ASCII_TABLE = [chr(c) if c in _UNRESERVED else f"%{c:02X}" for c in range(128)]
# Every byte's encoding, for text with non-ASCII bytes (Chinese): one str.translate over the
# bytes read as Latin-1 (a character per byte) encodes a whole batch in C, 1.5-2x faster than
# urllib's quote_from_bytes, which looks each byte up in Python.
_BYTE_TABLE = [chr(c) if c in _UNRESERVED else f"%{c:02X}" for c in range(256)]


def _encode_bytes(raw: bytes) -> str:
    """``percent_encode`` of UTF-8 bytes."""
    if not raw.isascii():
        return raw.decode("latin-1").translate(_BYTE_TABLE)
    unsafe = raw.translate(None, _UNRESERVED)  # the bytes that need an escape
    if not unsafe:
        return raw.decode("ascii")
    # The distinct characters, each found by stripping the previous ones (set(unsafe) would
    # make a Python int of every byte: most of the cost for a 100-recipient batch).
    kinds: list[int] = []
    while unsafe:
        if len(kinds) == 12:  # many distinct characters: one table pass beats many replaces
            return raw.decode("ascii").translate(_ASCII_TABLE)
        c = unsafe[0]
        kinds.append(c)
        unsafe = unsafe.replace(_ESCAPES[c][0], b"")
    if 0x25 in kinds:  # '%' first, so the escapes added below are not escaped again
        raw = raw.replace(b"%", b"%25")
        kinds.remove(0x25)
    for c in kinds:
        raw = raw.replace(*_ESCAPES[c])
    return raw.decode("ascii")


def percent_encode(s: str) -> str:
    """Aliyun's RFC 3986 encoding: UTF-8, ``A-Za-z0-9-_.~`` kept, every other byte ``%XX``.

    Same output as ``urllib.parse.quote(s, safe="-_.~")`` (so a space is ``%20``, ``*`` is
    ``%2A``); ASCII text, which is most of a batch, takes a few ``bytes.replace`` passes.
    """
    return _encode_bytes(s.encode())


def _encode_pairs(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(percent_encode(k), percent_encode(v)) for k, v in pairs]


def _join(encoded: Sequence[tuple[str, str]] | Sequence[tuple[str, str, str]]) -> str:
    """``k=v&...`` from encoded pairs (or the first two of triples)."""
    return "&".join([f"{p[0]}={p[1]}" for p in encoded])


# -- RPC signature V2 (HMAC-SHA1) -------------------------------------------------------
def _once_twice(value: str) -> tuple[str, str]:
    """``value`` encoded once (as sent) and twice (as the V2 string to sign holds it)."""
    encoded = percent_encode(value)
    # An encoded string holds unreserved characters and '%' only: encoding it again is '%' → '%25'.
    return encoded, encoded.replace("%", "%25")


def _twice(name: str, value: str) -> tuple[str, str, str]:
    """(encoded name, encoded value, value encoded twice): the V2 signing unit."""
    return (percent_encode(name), *_once_twice(value))


def _rpc_string_to_sign(method: str, params: list[tuple[str, str, str]]) -> str:
    """The V2 string to sign from ``_twice`` triples (sorted here, in place)."""
    params.sort()
    # The canonical query's own '=' and '&' are encoded as '%3D' and '%26'.
    canonical = "%26".join([f"{k.replace('%', '%25')}%3D{twice}" for k, _, twice in params])
    return f"{method.upper()}&%2F&{canonical}"


def _rpc_hmac(string_to_sign: str, secret: str) -> str:
    return base64.b64encode(hmac.digest(f"{secret}&".encode(), string_to_sign.encode(), "sha1")).decode()


def rpc_string_to_sign(method: str, params: Mapping[str, str]) -> str:
    """``METHOD&%2F&`` + the encoded canonical query of every parameter but ``Signature``."""
    return _rpc_string_to_sign(method, [_twice(k, v) for k, v in params.items() if k != "Signature"])


def rpc_signature(method: str, params: Mapping[str, str], secret: str) -> str:
    """Base64 HMAC-SHA1 with key ``secret + "&"``; ``params`` are query plus form parameters."""
    return _rpc_hmac(rpc_string_to_sign(method, params), secret)


# -- signature V3 (ACS3-HMAC-SHA256) --------------------------------------------------------
def v3_canonical_request(
    method: str,
    path: str,
    query: Sequence[tuple[str, str]],
    headers: Mapping[str, str],
    signed_headers: Sequence[str],
    body_sha256: str,
) -> str:
    """The V3 canonical request.

    ``headers`` are keyed by lower-case name and must hold every one of ``signed_headers``
    (lower-case, in the order given: sorted, as ``SignedHeaders`` lists them).
    """
    lines = "".join([f"{name}:{headers[name].strip()}\n" for name in signed_headers])
    return "\n".join(
        (
            method.upper(),
            path or "/",
            _join(sorted(_encode_pairs(query))),
            lines,
            ";".join(signed_headers),
            body_sha256,
        )
    )


def v3_signature(canonical_request: str, secret: str) -> str:
    """Lower-case hex HMAC-SHA256 (key: the bare secret) of the V3 string to sign."""
    to_sign = f"{V3_ALGORITHM}\n{hashlib.sha256(canonical_request.encode()).hexdigest()}"
    return hmac.digest(secret.encode(), to_sign.encode(), "sha256").hex()


def v3_sign_headers(
    method: str,
    path: str,
    query: Sequence[tuple[str, str]],
    headers: Mapping[str, str],
    body: bytes,
    credentials: AliyunCredentials,
) -> dict[str, str]:
    """``headers`` plus ``x-acs-content-sha256`` and ``authorization``, ready to send.

    ``headers`` are keyed by lower-case name and should hold ``host``, ``x-acs-action``,
    ``x-acs-version``, ``x-acs-date``, ``x-acs-signature-nonce`` and, with a body,
    ``content-type``. Signs ``host``, ``content-type`` and every ``x-acs-*`` header.
    """
    body_sha256 = hashlib.sha256(body).hexdigest()
    out = dict(headers)
    out["x-acs-content-sha256"] = body_sha256
    signed = sorted(h for h in out if h in ("host", "content-type") or h.startswith("x-acs-"))
    canonical = v3_canonical_request(method, path, query, out, signed, body_sha256)
    signature = v3_signature(canonical, credentials.access_key_secret)
    out["authorization"] = (
        f"{V3_ALGORITHM} Credential={credentials.access_key_id},"
        f"SignedHeaders={';'.join(signed)},Signature={signature}"
    )
    return out
