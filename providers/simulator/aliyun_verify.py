"""Checking Aliyun signatures: the simulator's side of providers/aliyun_sign.py."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence

from providers.aliyun_sign import V3_ALGORITHM, rpc_signature, v3_canonical_request, v3_signature

__all__ = ("parse_v3_authorization", "verify_v2", "verify_v3")


def parse_v3_authorization(value: str) -> tuple[str, list[str], str] | None:
    """``ACS3-HMAC-SHA256 Credential=..,SignedHeaders=..,Signature=..`` → (key id, headers, signature)."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != V3_ALGORITHM:
        return None
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, eq, val = part.strip().partition("=")
        if not eq or name in fields:
            return None
        fields[name] = val
    key_id, signed, signature = (fields.get(k) for k in ("Credential", "SignedHeaders", "Signature"))
    if not key_id or not signed or not signature:
        return None
    return key_id, signed.split(";"), signature


def _same(expected: str, given: str) -> bool:
    # compare_digest refuses non-ASCII str; a non-ASCII signature is simply wrong.
    return given.isascii() and hmac.compare_digest(expected.encode(), given.encode())


def verify_v2(method: str, params: Mapping[str, str], secret: str) -> bool:
    """Check an RPC V2 request: ``params`` are the decoded query plus form-body parameters."""
    given = params.get("Signature")
    if not given or params.get("SignatureMethod", "HMAC-SHA1") != "HMAC-SHA1":
        return False
    return _same(rpc_signature(method, params, secret), given)


def verify_v3(
    method: str,
    path: str,
    query: Sequence[tuple[str, str]],
    headers: Mapping[str, str],
    body: bytes,
    secret: str,
) -> bool:
    """Check a V3 request; ``headers`` keyed by lower-case name, values decoded.

    The body must match ``x-acs-content-sha256``; ``SignedHeaders`` must be lower-case,
    sorted, present, and cover ``host`` and every ``x-acs-*`` header sent.
    """
    parsed = parse_v3_authorization(headers.get("authorization", ""))
    if parsed is None:
        return False
    _, signed, given = parsed
    body_sha256 = hashlib.sha256(body).hexdigest()
    if headers.get("x-acs-content-sha256") != body_sha256:
        return False
    if signed != sorted(set(signed)) or any(h != h.lower() or h not in headers for h in signed):
        return False
    if "host" not in signed or any(h.startswith("x-acs-") and h not in signed for h in headers):
        return False
    canonical = v3_canonical_request(method, path, query, headers, signed, body_sha256)
    return _same(v3_signature(canonical, secret), given)
