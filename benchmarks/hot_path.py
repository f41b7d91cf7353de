"""CPU per recipient of each provider's hot path: ``build_wire`` + ``parse_response``.

``python -m benchmarks.hot_path [ROUNDS]`` signs ROUNDS 100-recipient batches per provider
(best of 5, ``time.process_time``) and prints one JSON line of microseconds per recipient.
No I/O: the response is a canned success. Compare two checkouts by running each in turn.
"""

from __future__ import annotations

import sys
import time

import httpx
import orjson

from providers.aliyun import TEST_CREDENTIALS, AliyunSms
from providers.base import Batch, Message, Provider
from providers.nxcloud import NxcloudCredentials, NxcloudSms
from providers.submail import SubmailCredentials, SubmailSms

BATCH = 100


def batches(same_text: bool) -> list[Batch]:
    """20 batches; SUBMAIL batchsend needs one text per batch."""
    out = []
    for b in range(20):
        msgs = [
            Message(
                i,
                f"k{i}",
                f"86139{b:02d}{i:06d}",
                {"code": f"{i:06d}", "name": f"n{i}"},
                "Acme",
                "Hello, the sale starts today" if same_text else f"Hello n{i}, code {i:06d}",
            )
            for i in range(BATCH)
        ]
        out.append(Batch(b, msgs, out_id=f"o-{b}"))
    return out


def main(rounds: int) -> dict[str, float]:
    aliyun_ok = orjson.dumps({"Code": "OK", "BizId": "b1", "RequestId": "r"})
    cases: dict[str, tuple[Provider, bytes, list[Batch]]] = {
        "aliyun-v3": (
            AliyunSms(credentials=TEST_CREDENTIALS, template_code="SMS_1"),
            aliyun_ok,
            batches(False),
        ),
        "aliyun-v2": (
            AliyunSms(credentials=TEST_CREDENTIALS, template_code="SMS_1", signature="v2"),
            aliyun_ok,
            batches(False),
        ),
        "submail": (
            SubmailSms(
                credentials=SubmailCredentials("10001", "abcdef0123456789abcdef0123456789"), batch_size=BATCH
            ),
            orjson.dumps({"status": "success", "send_id": "s", "fee": 1}),
            batches(True),
        ),
        "nxcloud": (
            NxcloudSms(
                credentials=NxcloudCredentials("ak", "secret-123456", "app"), run_tag="r1", batch_size=BATCH
            ),
            orjson.dumps({"code": 0, "message": "Success", "data": []}),
            batches(False),
        ),
    }
    result = {}
    for name, (provider, body, work) in cases.items():
        response = httpx.Response(200, content=body)
        best = float("inf")
        for _ in range(5):
            start = time.process_time()
            for r in range(rounds):
                batch = work[r % len(work)]
                provider.build_wire(batch)
                provider.parse_response(batch, response)
            best = min(best, time.process_time() - start)
        result[name] = round(best / (rounds * BATCH) * 1e6, 3)
    return result


if __name__ == "__main__":
    print(orjson.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)).decode())
