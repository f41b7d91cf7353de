"""The provider registry: every provider kind a campaign can name, from each module's ``SPEC``.

The pipeline asks this module, never a provider module by name: campaign.py validates
``[provider]`` keys and batch sizes, account.py builds the provider and reads its
credentials, reconcile.py picks the status query, the CLI masks every declared secret,
``sluice listen`` serves the receipt pushes and matches them.

Adding a provider: write ``providers/<name>.py`` (the :class:`~providers.base.Provider`
contract plus a ``SPEC = ProviderKind(...)``) and add it to ``_BUILTIN`` below, or call
:func:`register` (tests, plug-ins). ``kind = "simulator"`` is not a provider of its own: it
is the local simulator speaking ``protocol``, any registered kind that declares ``test_env``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from providers import aliyun, aliyun_card, nxcloud, submail
from providers.base import Provider
from providers.spec import ConfigKey, ProviderKind, ReceiptPush

__all__ = (
    "SIMULATOR",
    "config_keys",
    "kinds",
    "lookup",
    "protocol_of",
    "receipt_pushes",
    "register",
    "registered",
    "secret_names",
    "spec_of",
    "unregister",
)

SIMULATOR = "simulator"

_BUILTIN = (aliyun.SPEC, aliyun_card.SPEC, submail.SPEC, nxcloud.SPEC)
_KINDS: dict[str, ProviderKind] = {spec.kind: spec for spec in _BUILTIN}


def register(spec: ProviderKind) -> None:
    """Add a provider kind. Its ``[provider]`` keys must agree with those of the same name
    that other kinds declare (one key, one meaning)."""
    if spec.kind in _KINDS or spec.kind == SIMULATOR:
        raise ValueError(f"provider kind {spec.kind!r} is already registered")
    known = config_keys()
    for key in spec.config:
        if key.name in known and known[key.name] != key:
            raise ValueError(f"[provider] {key.name} is declared differently by another provider")
    push = spec.receipts
    if push is not None and (push.path.startswith("_") or "/" in push.path):
        raise ValueError(f"receipt path {push.path!r}: one segment, not starting with '_' (the listener's)")
    if push is not None and receipt_pushes().get(push.path, push) is not push:
        raise ValueError(f"receipt path {push.path!r} is another provider's")
    _KINDS[spec.kind] = spec


def unregister(kind: str) -> None:
    """Remove a kind added with :func:`register` (the built-in ones stay)."""
    if any(spec.kind == kind for spec in _BUILTIN):
        raise ValueError(f"{kind!r} is built in")
    _KINDS.pop(kind, None)


def registered() -> Iterator[ProviderKind]:
    return iter(tuple(_KINDS.values()))


def kinds() -> tuple[str, ...]:
    """Every value ``[provider] kind`` may take."""
    return (*_KINDS, SIMULATOR)


def lookup(kind: str) -> ProviderKind | None:
    return _KINDS.get(kind)


def protocol_of(kind: str, protocol: str) -> str:
    """The API spoken: the kind, or for the simulator the protocol it is asked to speak."""
    return protocol if kind == SIMULATOR else kind


def spec_of(provider: Provider) -> ProviderKind | None:
    """The declaration of a built provider (by its ``name``, which is its kind)."""
    return _KINDS.get(provider.name)


def config_keys() -> Mapping[str, ConfigKey]:
    """Every provider-specific ``[provider]`` key any registered kind declares."""
    return {key.name: key for spec in _KINDS.values() for key in spec.config}


def secret_names() -> tuple[str, ...]:
    """The environment variables holding secrets, of every registered kind."""
    return tuple(dict.fromkeys(name for spec in _KINDS.values() for name in spec.secret_names))


def receipt_pushes() -> dict[str, ReceiptPush]:
    """Path → the receipt push served there, of every registered kind that declares one
    (kinds speaking one receipt protocol share its path), in registration order."""
    return {spec.receipts.path: spec.receipts for spec in _KINDS.values() if spec.receipts is not None}
