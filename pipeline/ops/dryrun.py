"""Dry run: render and validate every row, count segments and cost, send nothing.

Segment rules:

* mainland China numbers (Aliyun domestic billing): signature + text ≤ 70 characters
  is one segment, longer messages are billed per 67;
* other numbers: GSM-7 text (every character in the GSM 03.38 basic set or its
  extension table, which counts double) is 160, then 153 per segment; anything else
  is UCS-2, 70 then 67.

The text counted is the one the provider's text limit counts (see
:func:`pipeline.render.campaign_text_limit`): the rendered content for NXCloud and SUBMAIL
batchsend/multisend; for a template held by the provider (Aliyun, SUBMAIL multixsend),
``【sign】`` + the template text with ``${param}`` filled in (``message.template_text``, the
approved template as the provider shows it), and without it only the signature and the
parameters, which the report says. Rows go through the run's admission stage
(:mod:`pipeline.admit`: keys, rendering, suppression, phone dedupe), so what a dry run
counts as sendable and its reject reasons are exactly what a run would admit.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pipeline.admit import Admission, Rejects, open_source
from pipeline.app.campaign import Campaign
from pipeline.keys import KeySet
from pipeline.render import campaign_text_limit, reason_group
from pipeline.source import check_decoded
from providers import registry
from providers.base import fill_template, sign_and_params

__all__ = ("DryRunReport", "dry_run", "segments")

_GSM_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM_EXTENDED = set("^{}\\[~]|€\f")


def segments(text: str, *, domestic_cn: bool) -> int:
    """How many billed segments ``text`` takes."""
    if domestic_cn:
        n = len(text)
        return 1 if n <= 70 else -(-n // 67)
    if all(c in _GSM_BASIC or c in _GSM_EXTENDED for c in text):
        n = len(text) + sum(1 for c in text if c in _GSM_EXTENDED)
        return 1 if n <= 160 else -(-n // 153)
    n = sum(2 if ord(c) > 0xFFFF else 1 for c in text)  # UTF-16 code units
    return 1 if n <= 70 else -(-n // 67)


@dataclass
class DryRunReport:
    rows: int = 0
    sendable: int = 0
    rejected: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    segments: int = 0
    by_segments: Counter[int] = field(default_factory=Counter)
    estimated_cost: float = 0.0
    counted_template: bool = False
    examples: list[tuple[int, str, str]] = field(default_factory=list)
    # The first rendered message per provider template: {template, row, phone, text, segments}.
    previews: list[dict[str, object]] = field(default_factory=list)
    requests: int = 0  # send requests the run would make (none retried)
    seconds: float = 0.0  # how long they take at [limits] requests_per_second (and recipients_per_second)

    def to_dict(self) -> dict[str, object]:
        return {
            "rows": self.rows,
            "sendable": self.sendable,
            "rejected": self.rejected,
            "reasons": dict(self.reasons.most_common()),
            "segments": self.segments,
            "by_segments": {str(k): v for k, v in sorted(self.by_segments.items())},
            "estimated_cost": round(self.estimated_cost, 4),
            "counted_template": self.counted_template,
            "rejected_examples": [{"row": r, "key": k, "reason": e} for r, k, e in self.examples],
            "previews": self.previews,
            "requests": self.requests,
            "seconds": round(self.seconds, 1),
        }


async def dry_run(campaign: Campaign, *, max_examples: int = 20) -> DryRunReport:
    """Read the whole source as a run would, without a ledger or a request."""
    limit = campaign_text_limit(campaign)
    template = campaign.message.template_text
    # counted_template: the whole text is counted, not only the signature and parameters
    report = DryRunReport(counted_template=limit.whole if limit is not None else template is not None)

    def rejected(rejects: Rejects) -> None:
        report.rejected += len(rejects)
        for row, key, reason in sorted(rejects):  # examples in row order
            report.reasons[reason_group(reason)] += 1
            if len(report.examples) < max_examples:
                report.examples.append((row, key, reason))

    admission = Admission(campaign, rejected)
    template_name = _template_name(campaign)
    # SUBMAIL batchsend groups recipients by their exact text: a request per distinct text at least.
    by_text = KeySet() if _groups_by_text(campaign) else None
    distinct_texts = 0
    first = True
    chunks = open_source(campaign, columnar=True).chunks()
    try:
        async for chunk in chunks:
            if first:
                check_decoded(chunk, campaign)  # as a run would: the wrong encoding stops here
                first = False
            texts: list[str] = []
            for m in admission.admit(chunk):
                if limit is not None:
                    text = limit.text(m)
                elif template is not None:
                    text = f"【{m.sign_name}】" + fill_template(template, m.params)
                else:
                    text = sign_and_params(m)
                n = segments(text, domestic_cn=m.phone.startswith("861"))
                if not report.previews:
                    report.previews.append(
                        {
                            "template": template_name,
                            "row": m.row,
                            "phone": m.phone,
                            "text": text,
                            "segments": n,
                        }
                    )
                texts.append(text)
                report.sendable += 1
                report.segments += n
                report.by_segments[n] += 1
            if by_text is not None and texts:
                distinct_texts += len(texts) - sum(by_text.add(texts))
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    report.rows = admission.rows_read
    report.estimated_cost = report.segments * campaign.message.price_per_segment
    limits = campaign.limits
    report.requests = max(-(-report.sendable // limits.batch_size), distinct_texts)
    report.seconds = report.requests / limits.requests_per_second
    if limits.recipients_per_second is not None:
        report.seconds = max(report.seconds, report.sendable / limits.recipients_per_second)
    return report


def _template_name(campaign: Campaign) -> str:
    """The provider template a message is sent with, as the campaign names it."""
    m = campaign.message
    if m.card_template_code:
        return f"card {m.card_template_code} (fallback {m.template_code or m.fallback_type})"
    if m.template_code:
        return m.template_code
    if m.project:
        return f"project {m.project}"
    return "message.content"


def _groups_by_text(campaign: Campaign) -> bool:
    protocol = registry.protocol_of(campaign.provider.kind, campaign.provider.protocol)
    return protocol == "submail" and campaign.provider.mode == "batchsend"
