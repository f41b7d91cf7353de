"""Campaign: load and validate a campaign file (TOML) before anything is sent.

Every problem is a :class:`~pipeline.errors.CampaignError` naming the field.
Paths are resolved against the campaign file's directory. Credentials never
live here: they come from environment variables (see README).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pipeline.errors import CampaignError
from pipeline.ledger import Durability
from pipeline.render import Template, TemplateError
from pipeline.schedule import Window, parse_window

ON_REFUSAL = ("split", "fail-batch")
"""What to do with a call refused because of some of its recipients (``[provider] on_refusal``)."""

__all__ = (
    "Campaign",
    "LimitsSpec",
    "MessageSpec",
    "ProviderSpec",
    "RunSpec",
    "ScheduleSpec",
    "SourceSpec",
    "load_campaign",
    "parse_campaign",
)

SOURCE_KINDS = ("csv", "jsonl", "sqlite", "postgres")
DB_KINDS = ("sqlite", "postgres")
_DB_ONLY = ("table", "query", "dsn_env", "shard", "key_from", "key_to")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*\Z")
PROVIDER_KINDS = ("aliyun", "aliyun-card", "submail", "nxcloud", "simulator")
PROTOCOLS = ("aliyun", "aliyun-card", "submail", "nxcloud")
MAX_BATCH = {"aliyun": 100, "aliyun-card": 100, "submail": 10_000, "nxcloud": 200}
SUBMAIL_MODES = ("batchsend", "multisend", "multixsend")


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    phone: str
    path: str = ""  # csv, jsonl, sqlite
    key: str | None = None
    delimiter: str = ","
    default_country: str = "86"
    # sqlite and postgres (see pipeline/db/)
    table: str | None = None
    query: str | None = None
    dsn_env: str | None = None  # the name of the environment variable holding the DSN
    snapshot: bool = False
    row_number: str = "rank"  # rank | key
    shard: str | None = None  # "i/n"
    key_from: int | float | str | None = None  # inclusive
    key_to: int | float | str | None = None  # exclusive
    # Never send to these: a file of phone numbers or keys, one per line.
    suppress: str | None = None
    dedupe_phone: bool = False  # reject a second row with the same number as "duplicate phone"


@dataclass(frozen=True)
class ProviderSpec:
    kind: str
    endpoint: str | None = None
    signature: str = "v3"
    timeout: float = 10.0
    connect_timeout: float = 5.0
    region_id: str | None = None
    verify_tls: bool = True
    protocol: str = "aliyun"  # for kind = "simulator": the protocol it speaks
    mode: str = "batchsend"  # submail: batchsend | multisend | multixsend
    sign_type: str = "md5"  # submail: md5 | sha1 | normal
    algorithm: str = "md5"  # nxcloud: md5 | sha256
    source_address: str | None = None  # nxcloud sender id
    # A call refused because of some of its recipients: "split" it until they stand alone,
    # or "fail-batch" (every recipient of it failed).
    on_refusal: str = "split"


@dataclass(frozen=True)
class MessageSpec:
    sign_name: str
    template_code: str = ""  # aliyun; for aliyun-card with fallback SMS, the fallback's
    params: dict[str, str] = field(default_factory=dict)
    content: str | None = None  # submail batchsend/multisend, nxcloud: text with {column}s
    project: str | None = None  # submail multixsend template
    card_template_code: str | None = None  # aliyun-card
    fallback_type: str = "SMS"  # aliyun-card: SMS | DIGITALSMS | NONE
    digital_template_code: str | None = None  # aliyun-card with DIGITALSMS
    # The approved template's text with ${name} placeholders: only for --dry-run's
    # segment count and cost estimate (the provider renders the real message).
    template_text: str | None = None
    price_per_segment: float = 0.0


@dataclass(frozen=True)
class LimitsSpec:
    requests_per_second: float = 100.0
    recipients_per_second: float | None = None  # optional second limit, per provider account
    concurrency: int = 16
    batch_size: int = 100
    max_attempts: int = 5
    linger_ms: int = 200
    backoff_base_ms: int = 200
    backoff_max_ms: int = 30_000
    breaker_window: int = 50  # batches; the circuit breaker looks at the last N outcomes
    breaker_threshold: float = 0.5  # stop when this share of them is unknown or deferred; 0 = off
    connect_failures: int = 5  # failed connects in a row (with backoff) that stop the run


@dataclass(frozen=True)
class RunSpec:
    dir: str | None = None
    durability: str = "process"
    fsync_interval_ms: int = 1000
    stop_deadline_s: float = 10.0


@dataclass(frozen=True)
class ScheduleSpec:
    window: str | None = None  # "08:00-21:00" local time; None: any time
    timezone: str = "UTC"
    days: list[str] | None = None  # ["mon", "tue", ...]; None: every day
    daily_cap: int | None = None  # recipients per day for the provider account

    def gate_window(self) -> Window | None:
        """The parsed window (raises ValueError naming the problem)."""
        if self.window is None:
            if self.days is not None:
                raise ValueError("days need a window")
            parse_window("00:00-23:59", self.timezone)  # still check the zone
            return None
        return parse_window(self.window, self.timezone, self.days)


@dataclass(frozen=True)
class Campaign:
    source: SourceSpec
    provider: ProviderSpec
    message: MessageSpec
    limits: LimitsSpec = field(default_factory=LimitsSpec)
    run: RunSpec = field(default_factory=RunSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)

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
    "schedule": ScheduleSpec,
}
_REQUIRED = {
    "source": ("kind", "phone"),
    "provider": ("kind",),
    "message": ("sign_name",),
}


_FLOATS = ("requests_per_second", "recipients_per_second", "breaker_threshold", "price_per_segment")


def _typed(section: str, name: str, value: object, default: object) -> object:
    where = f"{section}.{name}"
    if name == "params":
        if not isinstance(value, dict):
            raise CampaignError(where, 'must be a table of name = "template"')
        for k, v in value.items():
            if not isinstance(v, str):
                raise CampaignError(f"{where}.{k}", f"must be a string, not {type(v).__name__}")
        return dict(value)
    if name in ("key_from", "key_to"):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise CampaignError(where, f"must be a number or a string, not {value!r}")
        return value
    if name == "days":
        if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
            raise CampaignError(where, 'must be a list of day names, e.g. ["mon", "tue"]')
        return list(value)
    if name == "daily_cap":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CampaignError(where, f"must be a positive whole number, not {value!r}")
        return value
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
    _check_source(src)
    if src.get("path"):
        src["path"] = str((base_dir / src["path"]).resolve())
    if src.get("suppress") is not None:
        src["suppress"] = str((base_dir / src["suppress"]).resolve())
        if not Path(src["suppress"]).is_file():
            raise CampaignError("source.suppress", f"{src['suppress']} is not a readable file")
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

    protocol = prov.get("protocol", "aliyun") if prov["kind"] == "simulator" else prov["kind"]
    if protocol not in PROTOCOLS:
        raise CampaignError("provider.protocol", f"must be one of {', '.join(PROTOCOLS)}")
    if prov.get("mode", "batchsend") not in SUBMAIL_MODES:
        raise CampaignError("provider.mode", f"must be one of {', '.join(SUBMAIL_MODES)}")
    if prov.get("sign_type", "md5") not in ("md5", "sha1", "normal"):
        raise CampaignError("provider.sign_type", "must be md5, sha1 or normal")
    if prov.get("algorithm", "md5") not in ("md5", "sha256"):
        raise CampaignError("provider.algorithm", "must be md5 or sha256")
    if prov.get("on_refusal", "split") not in ON_REFUSAL:
        raise CampaignError("provider.on_refusal", f"must be one of {', '.join(ON_REFUSAL)}")
    _check_message(protocol, prov.get("mode", "batchsend"), sections["message"])  # type: ignore[arg-type]

    limits = LimitsSpec(**lim)
    cap = MAX_BATCH[protocol]
    if not 1 <= limits.batch_size <= cap:
        raise CampaignError("limits.batch_size", f"must be between 1 and {cap} for {protocol}")
    if not 0 < limits.requests_per_second <= 100_000:
        raise CampaignError("limits.requests_per_second", "must be above 0 and at most 100000")
    if limits.recipients_per_second is not None and limits.recipients_per_second < limits.batch_size:
        raise CampaignError("limits.recipients_per_second", "must be at least limits.batch_size")
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
    if not 1 <= limits.connect_failures <= 100:
        raise CampaignError("limits.connect_failures", "must be between 1 and 100")
    if limits.backoff_base_ms < 0 or limits.backoff_max_ms < limits.backoff_base_ms:
        raise CampaignError("limits.backoff_max_ms", "must be at least limits.backoff_base_ms")

    if run.get("durability", "process") not in {d.value for d in Durability}:
        raise CampaignError("run.durability", "must be process, batch or interval")
    if run.get("fsync_interval_ms", 1000) < 1:
        raise CampaignError("run.fsync_interval_ms", "must be at least 1")
    if run.get("dir") is not None:
        run["dir"] = str((base_dir / run["dir"]).resolve())

    sched: dict[str, Any] = sections["schedule"]  # type: ignore[assignment]
    schedule = ScheduleSpec(**sched)
    try:
        schedule.gate_window()
    except ValueError as exc:
        field_name = (
            "schedule.timezone"
            if "time zone" in str(exc)
            else ("schedule.days" if "days" in str(exc) else "schedule.window")
        )
        raise CampaignError(field_name, str(exc)) from None
    if schedule.daily_cap is not None and schedule.daily_cap < limits.batch_size:
        raise CampaignError("schedule.daily_cap", "must be at least limits.batch_size")

    campaign = Campaign(
        source=SourceSpec(**src),
        provider=ProviderSpec(**prov),
        message=MessageSpec(**sections["message"]),  # type: ignore[arg-type]
        limits=limits,
        run=RunSpec(**run),
        schedule=schedule,
    )
    try:
        campaign.templates()
    except TemplateError as exc:
        field_name = "message.sign_name"
        for k, v in campaign.message.params.items():
            if v in str(exc):
                field_name = f"message.params.{k}"
        raise CampaignError(field_name, str(exc)) from None
    if campaign.message.content is not None:
        try:
            Template.compile(campaign.message.content)
        except TemplateError as exc:
            raise CampaignError("message.content", str(exc)) from None
    return campaign


def _check_message(protocol: str, mode: str, msg: dict[str, Any]) -> None:
    """What each protocol needs in [message]."""
    if protocol == "aliyun" and not msg.get("template_code", "").strip():
        raise CampaignError("message.template_code", "is required for aliyun")
    if protocol == "aliyun-card":
        if not msg.get("card_template_code"):
            raise CampaignError("message.card_template_code", "is required for aliyun-card")
        fallback = msg.get("fallback_type", "SMS")
        if fallback not in ("SMS", "DIGITALSMS", "NONE"):
            raise CampaignError("message.fallback_type", "must be SMS, DIGITALSMS or NONE")
        if fallback == "SMS" and not msg.get("template_code"):
            raise CampaignError("message.template_code", "is required: the text template of the SMS fallback")
        if fallback == "DIGITALSMS" and not msg.get("digital_template_code"):
            raise CampaignError("message.digital_template_code", "is required with DIGITALSMS fallback")
    needs_content = protocol == "nxcloud" or (protocol == "submail" and mode in ("batchsend", "multisend"))
    if needs_content and not msg.get("content"):
        raise CampaignError("message.content", f"is required for {protocol}")
    if protocol == "submail" and mode == "multixsend" and not msg.get("project"):
        raise CampaignError("message.project", "is required for submail multixsend")


def _check_source(src: dict[str, Any]) -> None:
    """Kind-specific [source] keys; database sources are described in pipeline/db/."""
    kind = src["kind"]
    if kind == "postgres":
        if src.get("path"):
            raise CampaignError("source.path", "is not used by a postgres source (see source.dsn_env)")
    elif not src.get("path"):
        raise CampaignError("source.path", "is required")
    if kind not in DB_KINDS:
        for name in _DB_ONLY:
            if src.get(name) is not None:
                raise CampaignError(f"source.{name}", "is only for sqlite and postgres sources")
        if src.get("snapshot", False) or src.get("row_number", "rank") != "rank":
            name = "snapshot" if src.get("snapshot", False) else "row_number"
            raise CampaignError(f"source.{name}", "is only for sqlite and postgres sources")
        return
    if (src.get("table") is None) == (src.get("query") is None):
        raise CampaignError("source.table", f"a {kind} source needs a table or a query (one of them)")
    if src.get("table") is not None and not src["table"].strip():
        raise CampaignError("source.table", "must not be empty")
    if src.get("query") is not None:
        src["query"] = src["query"].strip().rstrip(";").strip()
        if not src["query"]:
            raise CampaignError("source.query", "must not be empty")
    if not src.get("key"):
        raise CampaignError(
            "source.key", f"is required for a {kind} source: a unique column to read, page and resume by"
        )
    if kind == "postgres":
        env = src.get("dsn_env")
        if env is None:
            raise CampaignError("source.dsn_env", "is required: the environment variable holding the DSN")
        if not _ENV_NAME.match(env):
            raise CampaignError(
                "source.dsn_env", "must name an environment variable (the DSN never goes here)"
            )
    elif src.get("dsn_env") is not None:
        raise CampaignError("source.dsn_env", "is only for postgres sources")
    if src.get("row_number", "rank") not in ("rank", "key"):
        raise CampaignError("source.row_number", 'must be "rank" or "key"')
    shard = src.get("shard")
    if shard is not None:
        m = _SHARD.match(shard)
        if m is None or not 1 <= int(m[1]) <= int(m[2]) <= 10_000:
            raise CampaignError("source.shard", 'must be "i/n" with 1 <= i <= n <= 10000, e.g. "2/4"')
        src["shard"] = f"{int(m[1])}/{int(m[2])}"
    lo, hi = src.get("key_from"), src.get("key_to")
    if lo is not None and hi is not None:
        if isinstance(lo, str) != isinstance(hi, str):
            raise CampaignError("source.key_to", "must be of the same type as source.key_from")
        if not lo < hi:
            raise CampaignError("source.key_to", "must be above source.key_from (the range is [from, to))")


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
