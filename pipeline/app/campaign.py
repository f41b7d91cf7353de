"""Campaign: load and validate a campaign file (TOML) before anything is sent.

Every problem is a :class:`~pipeline.errors.CampaignError` naming the field.
Paths are resolved against the campaign file's directory. Credentials never
live here: they come from environment variables (see README).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson

from pipeline.errors import CampaignError
from pipeline.ledger import Durability
from pipeline.render import Template, TemplateError
from pipeline.schedule import Window, parse_window
from providers import registry
from providers.spec import ConfigKey

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
    "campaign_warnings",
    "load_campaign",
    "parse_campaign",
)

SOURCE_KINDS = ("csv", "jsonl", "sqlite", "postgres")
ENCODINGS = {
    "utf-8": "utf-8",
    "utf8": "utf-8",
    "gb18030": "gb18030",
    "gbk": "gb18030",
    "gb2312": "gb18030",
    "utf-16": "utf-16",
}
"""``[source] encoding`` values, by the name the source uses (GB18030 is a superset of GBK and GB2312)."""
DEFAULT_MAX_REJECT_RATIO = 0.2
# Keys added after run directories were first written: left out of the campaign's digest at
# their defaults, so a run started before them resumes without --force.
_LATER_KEYS: dict[str, dict[str, object]] = {
    "source": {"encoding": "utf-8"},
    "limits": {"max_reject_ratio": DEFAULT_MAX_REJECT_RATIO},
    "schedule": {"start_at": None},
}
DB_KINDS = ("sqlite", "postgres")
_DB_ONLY = ("table", "query", "dsn_env", "shard", "key_from", "key_to")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*\Z")


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
    encoding: str = "utf-8"  # csv: utf-8 (a BOM allowed) | gb18030 (covers GBK, GB2312) | utf-16 (with a BOM)


@dataclass(frozen=True)
class ProviderSpec:
    kind: str
    endpoint: str | None = None
    # signature, region_id, mode, sign_type, algorithm, source_address: declared (type, choices)
    # by their providers' SPEC.config; fields here so that run.json and campaign hashes stay as were.
    signature: str = "v3"
    timeout: float = 10.0
    connect_timeout: float = 5.0
    region_id: str | None = None
    verify_tls: bool = True
    # An http:// forward proxy for every request (wins over HTTPS_PROXY and the like), without
    # credentials: they are secrets and run.json pins the campaign; SLUICE_PROXY_AUTH="user:password".
    proxy: str | None = None
    ca_file: str | None = None  # a CA bundle added to the system's trusted CAs
    protocol: str = "aliyun"  # for kind = "simulator": the protocol it speaks
    mode: str = "batchsend"  # submail: batchsend | multisend | multixsend
    sign_type: str = "md5"  # submail: md5 | sha1 | normal
    algorithm: str = "md5"  # nxcloud: md5 | sha256
    source_address: str | None = None  # nxcloud sender id
    # A call refused because of some of its recipients: "split" it until they stand alone,
    # or "fail-batch" (every recipient of it failed).
    on_refusal: str = "split"
    # Keys declared by a registered provider (providers/registry.py) that have no field above.
    options: dict[str, Any] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        """Every [provider] key with its value: what the provider is built from."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        return {**values, **self.options}


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
    # Stop before sending more once this share of the rows read is rejected (1 = never).
    max_reject_ratio: float = DEFAULT_MAX_REJECT_RATIO


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
    start_at: str | None = None  # "2026-12-05 09:00" in ``timezone``: nothing is sent before

    def start_time(self) -> dt.datetime | None:
        """``start_at`` as an aware datetime (raises ValueError naming the problem)."""
        if self.start_at is None:
            return None
        try:
            naive = dt.datetime.fromisoformat(self.start_at)
        except ValueError:
            raise ValueError(f"start_at {self.start_at!r} must look like 2026-12-05 09:00") from None
        if naive.tzinfo is not None:
            raise ValueError("start_at is a local time in schedule.timezone, without an offset")
        return naive.replace(tzinfo=ZoneInfo(self.timezone))

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
        data = asdict(self)
        data["provider"] = self.provider.settings()  # as the file has it (and the hash had it)
        return data

    def digest(self) -> str:
        """A stable hash of everything that decides what is sent."""
        data = self.to_dict()
        data.pop("run", None)
        for section, defaults in _LATER_KEYS.items():
            for name, default in defaults.items():
                if data[section].get(name) == default:
                    del data[section][name]
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


_FLOATS = (
    "requests_per_second",
    "recipients_per_second",
    "breaker_threshold",
    "price_per_segment",
    "max_reject_ratio",
)


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


def _declared(name: str, value: object, key: ConfigKey) -> object:
    """A provider-declared [provider] key: its declared type and, for strings, choices."""
    where = f"provider.{name}"
    if key.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, key.type) or (key.type is not bool and isinstance(value, bool)):
        raise CampaignError(where, f"must be a {key.type.__name__}, not {value!r}")
    if key.choices and value not in key.choices:
        raise CampaignError(where, f"must be one of {', '.join(key.choices)}")
    return value


def _check_proxy(prov: dict[str, Any], base_dir: Path) -> None:
    proxy = prov.get("proxy")
    if proxy is not None:
        try:
            url = httpx.URL(proxy)
        except httpx.InvalidURL:
            raise CampaignError("provider.proxy", "is not a valid URL") from None
        if url.userinfo:  # never echo the value: it holds a secret
            raise CampaignError(
                "provider.proxy",
                "must not hold credentials (the campaign is pinned into run.json): "
                'set SLUICE_PROXY_AUTH="user:password" in the environment instead',
            )
        if url.scheme != "http" or not url.host:
            raise CampaignError("provider.proxy", 'must be an http:// URL, e.g. "http://proxy.example:3128"')
    if prov.get("ca_file") is not None:
        prov["ca_file"] = str((base_dir / prov["ca_file"]).resolve())
        if not Path(prov["ca_file"]).is_file():
            raise CampaignError("provider.ca_file", f"{prov['ca_file']} is not a readable file")


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
        declared = registry.config_keys() if name == "provider" else {}
        for key in raw:
            if (key not in fields and key not in declared) or key == "options":
                raise CampaignError(f"{name}.{key}", "unknown key")
        for key in _REQUIRED.get(name, ()):
            if key not in raw:
                raise CampaignError(f"{name}.{key}", "is required")
        values = {
            k: _declared(k, v, declared[k]) if k in declared else _typed(name, k, v, defaults.get(k))
            for k, v in raw.items()
        }
        if declared:
            values["options"] = {k: values.pop(k) for k in list(values) if k not in fields}
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
    encoding = ENCODINGS.get(src.get("encoding", "utf-8").lower())
    if encoding is None:
        raise CampaignError("source.encoding", "must be utf-8, gb18030 (also for GBK and GB2312) or utf-16")
    if encoding != "utf-8" and src["kind"] != "csv":
        raise CampaignError("source.encoding", "is only for csv sources")
    src["encoding"] = encoding
    if not src.get("default_country", "86").isdigit():
        raise CampaignError("source.default_country", "must be a country calling code, e.g. 86")
    if prov["kind"] not in registry.kinds():
        raise CampaignError("provider.kind", f"must be one of {', '.join(registry.kinds())}")
    endpoint = prov.get("endpoint")
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise CampaignError("provider.endpoint", "must be an http:// or https:// URL")
    _check_proxy(prov, base_dir)
    for name in ("timeout", "connect_timeout"):
        if name in prov and not 0 < prov[name] <= 600:
            raise CampaignError(f"provider.{name}", "must be between 0 and 600 seconds")

    protocol = registry.protocol_of(prov["kind"], prov.get("protocol", "aliyun"))
    speaks = registry.lookup(protocol)
    if speaks is None or (prov["kind"] == registry.SIMULATOR and speaks.test_env is None):
        simulated = [s.kind for s in registry.registered() if s.test_env is not None]
        raise CampaignError("provider.protocol", f"must be one of {', '.join(simulated)}")
    if prov.get("on_refusal", "split") not in ON_REFUSAL:
        raise CampaignError("provider.on_refusal", f"must be one of {', '.join(ON_REFUSAL)}")
    options = {key.name: key.default for key in registry.config_keys().values()}
    message: dict[str, Any] = sections["message"]  # type: ignore[assignment]
    if protocol == "submail" and "mode" not in prov:
        _submail_mode_from_content(prov, message)
    problem = speaks.check_message({**options, **prov, **prov.get("options", {})}, message)
    if problem is not None:
        raise CampaignError(*problem)

    limits = LimitsSpec(**lim)
    cap = speaks.max_batch
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
    if not 0 < limits.max_reject_ratio <= 1:
        raise CampaignError("limits.max_reject_ratio", "must be above 0 and at most 1 (1: never stop)")
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
    try:
        schedule.start_time()
    except ValueError as exc:
        raise CampaignError("schedule.start_at", str(exc)) from None
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


def _submail_mode_from_content(prov: dict[str, Any], message: dict[str, Any]) -> None:
    """SUBMAIL without a ``mode``: ``batchsend`` for one text to all; for a ``content`` with
    per-recipient ``{column}``s, ``multisend``, its ``@var(column)`` filled from ``params``
    (batchsend would send one request per recipient: its batches share one text)."""
    content = message.get("content")
    if not isinstance(content, str):
        return
    try:
        template = Template.compile(content)
    except TemplateError:
        return  # reported with the field's name below
    literals = template.parts[::2]
    if not template.columns or any("{" in t or "}" in t for t in literals):
        return  # a literal brace: multisend's content is sent as written, so it cannot carry one
    prov["mode"] = "multisend"
    text = [f"@var({part})" if i % 2 else part for i, part in enumerate(template.parts)]
    message["content"] = "".join(text)
    message["params"] = {**{c: "{" + c + "}" for c in template.columns}, **message.get("params", {})}


def campaign_warnings(campaign: Campaign) -> list[str]:
    """What the operator should know before sending, though nothing is wrong."""
    out = []
    protocol = registry.protocol_of(campaign.provider.kind, campaign.provider.protocol)
    content = campaign.message.content
    if protocol == "submail" and campaign.provider.mode == "batchsend" and content is not None:
        if Template.compile(content).columns:
            out.append(
                'provider.mode = "batchsend" with per-recipient {columns} in message.content costs one '
                "request per recipient (a batchsend request carries one text): leave mode out, and "
                "multisend sends them in batches"
            )
    return out


def _check_source(src: dict[str, Any]) -> None:
    """Kind-specific [source] keys; database sources are described in pipeline/db/."""
    kind = src["kind"]
    if kind == "postgres":
        if src.get("path"):
            raise CampaignError("source.path", "is not used by a postgres source (see source.dsn_env)")
    elif not src.get("path"):
        raise CampaignError("source.path", "is required")
    _check_shard(src)
    if kind not in DB_KINDS:
        for name in _DB_ONLY:
            if name != "shard" and src.get(name) is not None:
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
    lo, hi = src.get("key_from"), src.get("key_to")
    if lo is not None and hi is not None:
        if isinstance(lo, str) != isinstance(hi, str):
            raise CampaignError("source.key_to", "must be of the same type as source.key_from")
        if not lo < hi:
            raise CampaignError("source.key_to", "must be above source.key_from (the range is [from, to))")


def _check_shard(src: dict[str, Any]) -> None:
    """``shard = "i/n"``: rows (files) or integer keys (databases) congruent to i - 1 modulo n."""
    shard = src.get("shard")
    if shard is not None:
        m = _SHARD.match(shard) if isinstance(shard, str) else None
        if m is None or not 1 <= int(m[1]) <= int(m[2]) <= 10_000:
            raise CampaignError("source.shard", 'must be "i/n" with 1 <= i <= n <= 10000, e.g. "2/4"')
        src["shard"] = f"{int(m[1])}/{int(m[2])}"


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
