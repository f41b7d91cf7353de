"""Campaign: load and validate a campaign file (TOML) before anything is sent.

Every problem is a :class:`~pipeline.errors.CampaignError` naming the field.
Paths are resolved against the campaign file's directory. Credentials never
live here: they come from environment variables (see README).
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pipeline.errors import CampaignError
from pipeline.ledger import Durability
from pipeline.render import Template, TemplateError

__all__ = (
    "Campaign",
    "LimitsSpec",
    "MessageSpec",
    "ProviderSpec",
    "RunSpec",
    "SourceSpec",
    "load_campaign",
    "parse_campaign",
)

SOURCE_KINDS = ("csv", "jsonl")
PROVIDER_KINDS = ("aliyun", "simulator")
MAX_BATCH = {"aliyun": 100, "simulator": 100}


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    path: str
    phone: str
    key: str | None = None
    delimiter: str = ","
    default_country: str = "86"


@dataclass(frozen=True)
class ProviderSpec:
    kind: str
    endpoint: str | None = None
    signature: str = "v3"
    timeout: float = 10.0
    connect_timeout: float = 5.0
    region_id: str | None = None
    verify_tls: bool = True


@dataclass(frozen=True)
class MessageSpec:
    template_code: str
    sign_name: str
    params: dict[str, str] = field(default_factory=dict)
    # The approved template's text with ${name} placeholders: only for --dry-run's
    # segment count and cost estimate (the provider renders the real message).
    template_text: str | None = None
    price_per_segment: float = 0.0


@dataclass(frozen=True)
class LimitsSpec:
    requests_per_second: float = 100.0
    concurrency: int = 16
    batch_size: int = 100
    max_attempts: int = 5
    linger_ms: int = 200
    backoff_base_ms: int = 200
    backoff_max_ms: int = 30_000
    breaker_window: int = 50  # batches; the circuit breaker looks at the last N outcomes
    breaker_threshold: float = 0.5  # stop when this share of them is unknown or deferred; 0 = off


@dataclass(frozen=True)
class RunSpec:
    dir: str | None = None
    durability: str = "process"
    fsync_interval_ms: int = 1000
    stop_deadline_s: float = 10.0


@dataclass(frozen=True)
class Campaign:
    source: SourceSpec
    provider: ProviderSpec
    message: MessageSpec
    limits: LimitsSpec = field(default_factory=LimitsSpec)
    run: RunSpec = field(default_factory=RunSpec)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def digest(self) -> str:
        """A stable hash of everything that decides what is sent."""
        data = self.to_dict()
        data.pop("run", None)
        return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def templates(self) -> tuple[Template, dict[str, Template]]:
        sign = Template.compile(self.message.sign_name)
        params = {k: Template.compile(v) for k, v in self.message.params.items()}
        return sign, params


_SECTIONS: dict[str, type] = {
    "source": SourceSpec,
    "provider": ProviderSpec,
    "message": MessageSpec,
    "limits": LimitsSpec,
    "run": RunSpec,
}
_REQUIRED = {
    "source": ("kind", "path", "phone"),
    "provider": ("kind",),
    "message": ("template_code", "sign_name"),
}


_FLOATS = ("requests_per_second", "breaker_threshold", "price_per_segment")


def _typed(section: str, name: str, value: object, default: object) -> object:
    where = f"{section}.{name}"
    if name == "params":
        if not isinstance(value, dict):
            raise CampaignError(where, 'must be a table of name = "template"')
        for k, v in value.items():
            if not isinstance(v, str):
                raise CampaignError(f"{where}.{k}", f"must be a string, not {type(v).__name__}")
        return dict(value)
    if isinstance(default, bool) or name == "verify_tls":
        if not isinstance(value, bool):
            raise CampaignError(where, f"must be true or false, not {value!r}")
        return value
    if isinstance(default, float) or name in _FLOATS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CampaignError(where, f"must be a number, not {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise CampaignError(where, f"must be a whole number, not {value!r}")
        return value
    if not isinstance(value, str):
        raise CampaignError(where, f"must be a string, not {value!r}")
    return value


def parse_campaign(data: Mapping[str, Any], base_dir: Path) -> Campaign:
    """Validate a parsed campaign document; resolve paths against ``base_dir``."""
    for name in data:
        if name not in _SECTIONS:
            raise CampaignError(name, f"unknown section (expected one of {', '.join(_SECTIONS)})")
    sections: dict[str, object] = {}
    for name, cls in _SECTIONS.items():
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            raise CampaignError(name, "must be a table")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        defaults = {k: f.default for k, f in fields.items()}
        for key in raw:
            if key not in fields:
                raise CampaignError(f"{name}.{key}", "unknown key")
        for key in _REQUIRED.get(name, ()):
            if key not in raw:
                raise CampaignError(f"{name}.{key}", "is required")
        values = {k: _typed(name, k, v, defaults.get(k)) for k, v in raw.items()}
        sections[name] = values
    src: dict[str, Any] = sections["source"]  # type: ignore[assignment]
    prov: dict[str, Any] = sections["provider"]  # type: ignore[assignment]
    lim: dict[str, Any] = sections["limits"]  # type: ignore[assignment]
    run: dict[str, Any] = sections["run"]  # type: ignore[assignment]

    if src["kind"] not in SOURCE_KINDS:
        raise CampaignError("source.kind", f"must be one of {', '.join(SOURCE_KINDS)}")
    src["path"] = str((base_dir / src["path"]).resolve())
    if len(src.get("delimiter", ",")) != 1:
        raise CampaignError("source.delimiter", "must be one character")
    if not src.get("default_country", "86").isdigit():
        raise CampaignError("source.default_country", "must be a country calling code, e.g. 86")
    if prov["kind"] not in PROVIDER_KINDS:
        raise CampaignError("provider.kind", f"must be one of {', '.join(PROVIDER_KINDS)}")
    if prov.get("signature", "v3") not in ("v3", "v2"):
        raise CampaignError("provider.signature", "must be v3 or v2")
    endpoint = prov.get("endpoint")
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise CampaignError("provider.endpoint", "must be an http:// or https:// URL")
    for name in ("timeout", "connect_timeout"):
        if name in prov and not 0 < prov[name] <= 600:
            raise CampaignError(f"provider.{name}", "must be between 0 and 600 seconds")

    limits = LimitsSpec(**lim)
    cap = MAX_BATCH[prov["kind"]]
    if not 1 <= limits.batch_size <= cap:
        raise CampaignError("limits.batch_size", f"must be between 1 and {cap} for {prov['kind']}")
    if not 0 < limits.requests_per_second <= 100_000:
        raise CampaignError("limits.requests_per_second", "must be above 0 and at most 100000")
    if not 1 <= limits.concurrency <= 1024:
        raise CampaignError("limits.concurrency", "must be between 1 and 1024")
    if not 1 <= limits.max_attempts <= 100:
        raise CampaignError("limits.max_attempts", "must be between 1 and 100")
    if not 0 <= limits.linger_ms <= 60_000:
        raise CampaignError("limits.linger_ms", "must be between 0 and 60000")
    if not 0 <= limits.breaker_threshold <= 1:
        raise CampaignError("limits.breaker_threshold", "must be between 0 (off) and 1")
    if limits.breaker_window < 1:
        raise CampaignError("limits.breaker_window", "must be at least 1")
    if limits.backoff_base_ms < 0 or limits.backoff_max_ms < limits.backoff_base_ms:
        raise CampaignError("limits.backoff_max_ms", "must be at least limits.backoff_base_ms")

    if run.get("durability", "process") not in {d.value for d in Durability}:
        raise CampaignError("run.durability", "must be process, batch or interval")
    if run.get("fsync_interval_ms", 1000) < 1:
        raise CampaignError("run.fsync_interval_ms", "must be at least 1")
    if run.get("dir") is not None:
        run["dir"] = str((base_dir / run["dir"]).resolve())

    campaign = Campaign(
        source=SourceSpec(**src),
        provider=ProviderSpec(**prov),
        message=MessageSpec(**sections["message"]),  # type: ignore[arg-type]
        limits=limits,
        run=RunSpec(**run),
    )
    try:
        campaign.templates()
    except TemplateError as exc:
        field_name = "message.sign_name"
        for k, v in campaign.message.params.items():
            if v in str(exc):
                field_name = f"message.params.{k}"
        raise CampaignError(field_name, str(exc)) from None
    if not campaign.message.template_code.strip():
        raise CampaignError("message.template_code", "must not be empty")
    return campaign


def load_campaign(path: Path) -> Campaign:
    """Read and validate a campaign file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CampaignError("(file)", f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CampaignError("(file)", f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CampaignError("(file)", f"{path} is not valid TOML: {exc}") from None
    return parse_campaign(data, path.parent.resolve())
