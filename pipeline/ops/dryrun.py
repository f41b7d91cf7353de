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
from pipeline.render import campaign_text_limit, reason_group
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
    chunks = open_source(campaign, columnar=True).chunks()
    try:
        async for chunk in chunks:
            for m in admission.admit(chunk):
                if limit is not None:
                    text = limit.text(m)
                elif template is not None:
                    text = f"【{m.sign_name}】" + fill_template(template, m.params)
                else:
                    text = sign_and_params(m)
                n = segments(text, domestic_cn=m.phone.startswith("861"))
                report.sendable += 1
                report.segments += n
                report.by_segments[n] += 1
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    report.rows = admission.rows_read
    report.estimated_cost = report.segments * campaign.message.price_per_segment
    return report
