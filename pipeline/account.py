"""Account: the provider a campaign sends through, with credentials from the environment only.

``provider.kind`` names the API: ``aliyun`` (SendBatchSms), ``aliyun-card``
(SendBatchCardSms), ``submail``, ``nxcloud``, or ``simulator``: the local simulator
speaking ``provider.protocol`` (one of the four), with the environment's
credentials when set and each protocol's documented test credentials otherwise.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Literal

import httpx

from pipeline.campaign import Campaign
from pipeline.errors import CampaignError
from providers.aliyun import TEST_CREDENTIALS, AliyunCredentials, AliyunSms, CredentialsError
from providers.aliyun_card import AliyunCardSms
from providers.base import Provider
from providers.nxcloud import NxcloudCredentials, NxcloudSms
from providers.submail import SubmailCredentials, SubmailSms, parse_timestamp

__all__ = ("ENV_VARS", "make_provider", "protocol_of", "sync_server_clock")

ENV_VARS: Mapping[str, tuple[str, ...]] = {
    "aliyun": ("ALIYUN_ACCESS_KEY_ID", "ALIYUN_ACCESS_KEY_SECRET"),
    "aliyun-card": ("ALIYUN_ACCESS_KEY_ID", "ALIYUN_ACCESS_KEY_SECRET"),
    "submail": ("SUBMAIL_APPID", "SUBMAIL_APPKEY"),
    "nxcloud": ("NXCLOUD_ACCESS_KEY", "NXCLOUD_ACCESS_SECRET", "NXCLOUD_APP_KEY"),
}
# The documented test credentials the simulator accepts when the environment has none.
_TEST_ENV: Mapping[str, Mapping[str, str]] = {
    "aliyun": {"ALIYUN_ACCESS_KEY_ID": TEST_CREDENTIALS.access_key_id,
               "ALIYUN_ACCESS_KEY_SECRET": TEST_CREDENTIALS.access_key_secret},
    "submail": {"SUBMAIL_APPID": "10001", "SUBMAIL_APPKEY": "abcdef0123456789abcdef0123456789"},
    "nxcloud": {"NXCLOUD_ACCESS_KEY": "fme2na3kdi3ki", "NXCLOUD_ACCESS_SECRET": "abciiiko2k3",
                "NXCLOUD_APP_KEY": "yourAppKey", "NXCLOUD_APP_SECRET": "yourAppSecret"},
}  # fmt: skip
_ENDPOINTS = {
    "aliyun": "https://dysmsapi.aliyuncs.com",
    "aliyun-card": "https://dysmsapi.aliyuncs.com",
    "submail": "https://api-v4.mysubmail.com",
    "nxcloud": "https://api2.nxcloud.com",
}


def protocol_of(campaign: Campaign) -> str:
    """The wire protocol: the kind, or for the simulator the protocol it is asked to speak."""
    spec = campaign.provider
    return spec.protocol if spec.kind == "simulator" else spec.kind


def _environ(campaign: Campaign, environ: Mapping[str, str]) -> Mapping[str, str]:
    protocol = protocol_of(campaign)
    names = ENV_VARS[protocol]
    if campaign.provider.kind == "simulator" and not all(environ.get(n) for n in names):
        return _TEST_ENV["aliyun" if protocol == "aliyun-card" else protocol]
    missing = [n for n in names if not environ.get(n)]
    if missing:
        raise CampaignError("provider.kind", f"{protocol} needs the environment variable {missing[0]}")
    return environ


def make_provider(
    campaign: Campaign,
    *,
    run_id: str = "",
    endpoint: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Provider:
    """Build the campaign's provider. ``endpoint`` (a base URL: scheme and host) overrides the
    campaign's, as for the embedded simulator."""
    spec, message = campaign.provider, campaign.message
    protocol = protocol_of(campaign)
    env = _environ(campaign, environ)
    url = endpoint or spec.endpoint
    if url is None:
        if spec.kind == "simulator":
            raise CampaignError("provider.endpoint", "a simulator campaign run from Python needs one")
        url = _ENDPOINTS[protocol]
    signature: Literal["v3", "v2"] = "v2" if spec.signature == "v2" else "v3"
    try:
        if protocol == "aliyun":
            return AliyunSms(
                credentials=AliyunCredentials.from_env(env),
                template_code=message.template_code,
                endpoint=url,
                signature=signature,
                region_id=spec.region_id,
            )
        if protocol == "aliyun-card":
            card = AliyunCardSms(
                credentials=AliyunCredentials.from_env(env),
                card_template_code=message.card_template_code or "",
                fallback_type=message.fallback_type,  # type: ignore[arg-type]
                sms_template_code=message.template_code if message.fallback_type == "SMS" else None,
                digital_template_code=(
                    message.digital_template_code if message.fallback_type == "DIGITALSMS" else None
                ),
                endpoint=url,
                signature=signature,
                region_id=spec.region_id,
            )
            card.check_params(message.params.keys())
            return card
        if protocol == "submail":
            return SubmailSms(
                credentials=SubmailCredentials.from_env(env),
                mode=spec.mode,  # type: ignore[arg-type]
                content=message.content if spec.mode == "multisend" else None,
                project=message.project if spec.mode == "multixsend" else None,
                batch_size=campaign.limits.batch_size,
                sign_type=spec.sign_type,  # type: ignore[arg-type]
                endpoint=url,
            )
        return NxcloudSms(
            credentials=NxcloudCredentials.from_env(env),
            run_tag=run_id,
            batch_size=campaign.limits.batch_size,
            algorithm=spec.algorithm,  # type: ignore[arg-type]
            source_address=spec.source_address,
            endpoint=url.rstrip("/") + "/v1/sms/multi/mt",
            record_url=url.rstrip("/") + "/api/sms/get",
        )
    except CredentialsError as exc:
        raise CampaignError("provider.kind", f"{protocol} needs credentials: {exc}") from None
    except ValueError as exc:
        raise CampaignError("message", str(exc)) from None


async def sync_server_clock(provider: Provider, transport: httpx.AsyncBaseTransport) -> float | None:
    """For providers that sign with the server's clock (SUBMAIL md5/sha1): measure the offset.

    Returns the offset in seconds, or None when the provider needs none.
    """
    if not isinstance(provider, SubmailSms) or not provider.requires_server_time:
        return None
    request = provider.timestamp_request()
    request.extensions["timeout"] = httpx.Timeout(10.0).as_dict()
    sent = time.time()
    response = await transport.handle_async_request(request)
    await response.aread()
    received = time.time()
    provider.set_server_offset(parse_timestamp(response), (sent + received) / 2)
    return provider.server_offset
