"""Account: the provider a campaign sends through, with credentials from the environment only.

``provider.kind`` names the API: a kind of providers/registry.py (``aliyun``, ``aliyun-card``,
``submail``, ``nxcloud``, ...), or ``simulator``: the local simulator speaking
``provider.protocol``, with the environment's credentials when set and the protocol's
documented test credentials otherwise. Everything provider-specific (variables, endpoint,
how to build it, clock sync) is the provider's declaration; nothing here names a provider.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping

import httpx

from pipeline.app.campaign import Campaign
from pipeline.errors import CampaignError
from providers import registry
from providers.base import CredentialsError, Provider
from providers.spec import MIN_SECRET_LENGTH, ProviderKind, ProviderSettings

__all__ = (
    "check_credentials",
    "limiter_account",
    "make_provider",
    "protocol_of",
    "provider_kind",
    "sync_server_clock",
)


def protocol_of(campaign: Campaign) -> str:
    """The wire protocol: the kind, or for the simulator the protocol it is asked to speak."""
    return registry.protocol_of(campaign.provider.kind, campaign.provider.protocol)


def provider_kind(campaign: Campaign) -> ProviderKind:
    """The registry's declaration of the API the campaign speaks (checked by the campaign)."""
    spec = registry.lookup(protocol_of(campaign))
    if spec is None:
        raise CampaignError("provider.kind", f"{protocol_of(campaign)!r} is not a registered provider")
    return spec


def _environ(campaign: Campaign, spec: ProviderKind, environ: Mapping[str, str]) -> Mapping[str, str]:
    """The credentials' environment: the process's, or the simulator's documented test
    credentials when it lacks them. A secret shorter than MIN_SECRET_LENGTH is refused."""
    names = [v.name for v in spec.env if v.required]
    if campaign.provider.kind == registry.SIMULATOR and spec.test_env is not None:
        if not all(environ.get(n) for n in names):
            return spec.test_env
    missing = [n for n in names if not environ.get(n)]
    if missing:
        raise CampaignError("provider.kind", f"{spec.kind} needs the environment variable {missing[0]}")
    for var in spec.env:
        value = environ.get(var.name, "").strip()
        if var.secret and value and len(value) < MIN_SECRET_LENGTH:
            raise CampaignError(
                "provider.kind",
                f"the environment variable {var.name} is too short to be a {spec.kind} secret "
                f"(under {MIN_SECRET_LENGTH} characters)",
            )
    return environ


def check_credentials(campaign: Campaign, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse missing or too short credentials before anything starts (CampaignError)."""
    _environ(campaign, provider_kind(campaign), environ)


def make_provider(
    campaign: Campaign,
    *,
    run_id: str = "",
    endpoint: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Provider:
    """Build the campaign's provider. ``endpoint`` (a base URL: scheme and host) overrides the
    campaign's, as for the embedded simulator."""
    spec = provider_kind(campaign)
    env = _environ(campaign, spec, environ)
    url = endpoint or campaign.provider.endpoint
    if url is None:
        if campaign.provider.kind == registry.SIMULATOR:
            raise CampaignError("provider.endpoint", "a simulator campaign run from Python needs one")
        url = spec.default_endpoint
    settings = ProviderSettings(
        endpoint=url,
        environ=env,
        options={**{key.name: key.default for key in spec.config}, **campaign.provider.settings()},
        message=dataclasses.asdict(campaign.message),
        batch_size=campaign.limits.batch_size,
        run_id=run_id,
    )
    try:
        return spec.build(settings)
    except CredentialsError as exc:
        raise CampaignError("provider.kind", f"{spec.kind} needs credentials: {exc}") from None
    except ValueError as exc:
        raise CampaignError("message", str(exc)) from None


def limiter_account(
    campaign: Campaign, *, endpoint: str | None = None, environ: Mapping[str, str] = os.environ
) -> str:
    """The account's key in a shared lease limiter: a hash of the protocol, the endpoint and the
    credentials' non-secret parts (access key id, appid); never a secret."""
    from pipeline.scale.lease import account_key

    spec = provider_kind(campaign)
    env = _environ(campaign, spec, environ)
    url = endpoint or campaign.provider.endpoint or spec.default_endpoint
    return account_key(spec.kind, url, [env.get(v.name, "") for v in spec.env if not v.secret])


async def sync_server_clock(provider: Provider, transport: httpx.AsyncBaseTransport) -> float | None:
    """For providers that sign with the server's clock (SUBMAIL md5/sha1): measure the offset.

    Returns the offset in seconds, or None when the provider needs none.
    """
    spec = registry.spec_of(provider)
    sync = spec.clock_sync if spec is not None else None
    request = sync.request(provider) if sync is not None else None
    if sync is None or request is None:
        return None
    request.extensions["timeout"] = httpx.Timeout(10.0).as_dict()
    sent = time.time()
    response = await transport.handle_async_request(request)
    await response.aread()
    received = time.time()
    return sync.apply(provider, response, (sent + received) / 2)
