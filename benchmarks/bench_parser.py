"""HTTP/1.1 response parsers side by side: sluice's hand-written one (as of issue 14), h11, httptools.

::

    .venv/bin/python -m benchmarks.bench_parser [--responses 20000] [--rounds 5]

Each parser is fed the same realistic provider responses (Aliyun's SendBatchSms JSON with
Content-Length, SUBMAIL's chunked JSON, an NXCloud body framed by the close) in packets of
the whole response, of 64 bytes and of 7 bytes, and must give back the same status, headers
and body. Reported: µs of CPU per response (median over rounds), per parser and packet size.
The hand-written parser is kept here verbatim as it was, so the figures can be reproduced.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Callable

import h11
import httptools

Parsed = tuple[int, list[tuple[bytes, bytes]], bytes]

ALIYUN_BODY = (
    b'{"Message":"OK","RequestId":"F655A8D5-B967-440B-8683-DAD6FF8DE990",'
    b'"Code":"OK","BizId":"900619746936498440^0"}'
)
SUBMAIL_BODY = (
    b'{"status":"success","send_id":"093c0a7df143c087d6cba9cdf0cf3738","fee":1,"sms_credits":14197,'
    b'"transactional_sms_credits":0}'
)
NXCLOUD_BODY = b'{"code":0,"message":"success","data":{"messageId":"1001","failures":[]}}'


def _chunked(body: bytes, size: int) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


RESPONSES: dict[str, tuple[bytes, bool]] = {  # name: (wire bytes, framed by the close)
    "aliyun content-length": (
        b"HTTP/1.1 200 OK\r\nDate: Fri, 04 Dec 2026 10:00:00 GMT\r\n"
        b"Content-Type: application/json;charset=utf-8\r\nContent-Length: %d\r\nConnection: keep-alive\r\n"
        b"x-acs-request-id: F655A8D5-B967-440B-8683\r\n"
        b"x-acs-trace-id: 8b1f0e3c9d2a4e5f\r\nAccess-Control-Allow-Origin: *\r\n\r\n%s"
        % (len(ALIYUN_BODY), ALIYUN_BODY),
        False,
    ),
    "submail chunked": (
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Fri, 04 Dec 2026 10:00:00 GMT\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
        + _chunked(SUBMAIL_BODY, 48),
        False,
    ),
    "nxcloud until-close": (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + NXCLOUD_BODY,
        True,
    ),
}


# -- sluice's parser before issue 14 (pipeline/transport.py _parse/_dechunk), kept verbatim -------------

_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


def _legacy_head(head: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError("status line")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise ValueError("header line")
        headers.append((name, value.strip()))
    return int(parts[1]), headers


def _legacy_length(headers: list[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        lower = name.lower()
        if lower == b"transfer-encoding":
            return -2 if value.lower().rsplit(b",", 1)[-1].strip() == b"chunked" else -1
        if lower == b"content-length":
            return int(value)
    return -1


def _legacy_dechunk(buf: bytearray, at: int) -> bytes | None:
    out: list[bytes] = []
    pos = at
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size_text = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(size_text):
            raise ValueError("chunk size")
        size = int(size_text, 16)
        pos = eol + 2
        if size == 0:
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                if eol == pos:
                    return b"".join(out)
                pos = eol + 2
        if len(buf) < pos + size + 2:
            return None
        out.append(bytes(buf[pos : pos + size]))
        pos += size + 2


def legacy(packets: list[bytes], until_close: bool) -> Parsed:
    buf = bytearray()
    head: tuple[int, list[tuple[bytes, bytes]]] | None = None
    at = need = 0
    for packet in packets:
        buf += packet
        if head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                continue
            head = _legacy_head(bytes(buf[:end]))
            at, need = end + 4, _legacy_length(head[1])
        if need >= 0 and len(buf) - at >= need:
            return head[0], head[1], bytes(buf[at : at + need])
        if need == -2 and (body := _legacy_dechunk(buf, at)) is not None:
            return head[0], head[1], body
    assert head is not None and until_close
    return head[0], head[1], bytes(buf[at:])


def with_h11(packets: list[bytes], until_close: bool) -> Parsed:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
    conn.send(h11.EndOfMessage())
    status, headers, body = 0, [], bytearray()
    for packet in [*packets, b""] if until_close else packets:
        conn.receive_data(packet)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                break
            if isinstance(event, h11.Response):
                status, headers = event.status_code, list(event.headers.raw_items())
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, bytes(body)
    raise AssertionError("incomplete")


class _HttptoolsSink:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        self.done = True


def with_httptools(packets: list[bytes], until_close: bool) -> Parsed:
    sink = _HttptoolsSink()
    parser = httptools.HttpResponseParser(sink)
    for packet in packets:
        parser.feed_data(packet)
        if sink.done:
            break
    assert sink.done or until_close
    return parser.get_status_code(), sink.headers, b"".join(sink.body)


PARSERS: dict[str, Callable[[list[bytes], bool], Parsed]] = {
    "sluice (hand-written)": legacy,
    "h11 0.16": with_h11,
    "httptools 0.9 (llhttp)": with_httptools,
}


def packets_of(data: bytes, size: int | None) -> list[bytes]:
    return [data] if size is None else [data[i : i + size] for i in range(0, len(data), size)]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_parser", description=__doc__.split("\n")[0])
    p.add_argument("--responses", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    sizes: list[int | None] = [None, 64, 7]
    print(f"µs CPU per response, median of {args.rounds} rounds of {args.responses} responses")
    print("| response | packets | " + " | ".join(PARSERS) + " |")
    print("|---|---|" + "---|" * len(PARSERS))
    for name, (wire, until_close) in RESPONSES.items():
        for size in sizes:
            packets = packets_of(wire, size)
            expected = legacy(packets, until_close)
            cells = []
            for parse in PARSERS.values():
                status, headers, body = parse(packets, until_close)
                assert (status, body) == (expected[0], expected[2]), parse
                assert [(k.lower(), v) for k, v in headers] == [(k.lower(), v) for k, v in expected[1]]
                times = []
                for _ in range(args.rounds):
                    start = time.process_time()
                    for _ in range(args.responses):
                        parse(packets, until_close)
                    times.append((time.process_time() - start) * 1e6 / args.responses)
                cells.append(f"{statistics.median(times):.2f}")
            label = "whole" if size is None else f"{size} B"
            print(f"| {name} | {label} ({len(packets)}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
