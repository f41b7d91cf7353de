"""A minimal, cheap HTTP/1.1 responder standing in for the providers' batch APIs.

``python -m benchmarks.responder [--port 0]`` listens on 127.0.0.1 only and prints its
base URL as the first line of stdout. A POST is answered by its path:

* ``/sms/multixsend`` (SUBMAIL): a JSON array of one ``{"status":"success",...}`` per
  recipient, matched by position; recipients counted as the ``%22to%22`` in the form body;
* ``/v1/sms/multi/mt`` (NXCloud): ``{"code":0,...,"data":[...]}``, one ``Success`` item per
  request item (the body is parsed with orjson for the items' numbers and ids);
* anything else (Aliyun SendBatchSms): its success body; the recipients in its
  ``PhoneNumberJson`` form field are counted (a JSON list of digit strings: its commas,
  percent-encoded as ``%2C``, plus one). No signature check, no JSON parse.

Its CPU per request must stay far below the clients measured against it (the benchmarks
report the figure). ``GET /service/timestamp`` answers SUBMAIL's ``{"timestamp": now}``.

``GET /__stats`` returns the counters as JSON; ``GET /__reset`` zeroes them (not the
CPU clock); ``GET /__watch?pid=N`` makes the next first POST record process N's CPU time
so far (``first_post_client_cpu_s``, from ``/proc/N/stat``): a client's CPU to its first
request. Timestamps are ``time.monotonic()``, the system-wide CLOCK_MONOTONIC, so
another process on the machine can compare them with its own. On SIGTERM or SIGINT the
final counters go to stderr as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from typing import cast

import orjson

__all__ = ("Counters", "ResponderProtocol", "count_recipients", "main")

OK_BODY = b'{"Code":"OK","Message":"OK","BizId":"1^0","RequestId":"x"}'
OK_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json;charset=utf-8\r\n"
    b"Content-Length: " + str(len(OK_BODY)).encode() + b"\r\n"
    b"\r\n" + OK_BODY
)
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)
_SUBMAIL_PATH = b"POST /sms/multixsend "
_NXCLOUD_PATH = b"POST /v1/sms/multi/mt "
_SUBMAIL_TO = b"%22to%22"  # each multi entry's "to", percent-encoded
_SUBMAIL_ENTRY = b'{"status":"success","send_id":"0123456789abcdef0123456789abcdef","fee":1}'
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_FIELD = b"PhoneNumberJson="
_SEPARATOR = b"%2C"  # the commas of a JSON list of digit strings
MAX_HEAD = 64 * 1024


def count_recipients(body: bytes) -> int:
    """Numbers in the ``PhoneNumberJson`` form field of a SendBatchSms body (0 if absent)."""
    start = body.find(_FIELD)
    if start < 0:
        return 0
    start += len(_FIELD)
    end = body.find(b"&", start)
    if end < 0:
        end = len(body)
    if end - start <= 6:  # %5B%5D: an empty list
        return 0
    return body.count(_SEPARATOR, start, end) + 1


def _json_response(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


def nxcloud_answer(body: bytes) -> tuple[int, bytes]:
    """(items, the success answer) for an NXCloud ``multi/mt`` body; (0, an error) if unreadable."""
    try:
        items = orjson.loads(body)["items"]
        data = [{"phone": i["phone"], "messageid": i["sysMessageId"], "status": "Success"} for i in items]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return 0, b'{"code":9000,"message":"Request parameter error","data":null}'
    return len(data), orjson.dumps({"code": 0, "message": "Success", "data": data})


class Counters:
    """What the responder saw since the last reset."""

    __slots__ = ("first_post", "first_post_client_cpu_s", "last_post", "posts", "recipients", "watch_pid")

    def __init__(self) -> None:
        self.posts = 0
        self.recipients = 0
        self.first_post = 0.0
        self.last_post = 0.0
        self.watch_pid = 0
        self.first_post_client_cpu_s: float | None = None

    def reset(self) -> None:
        self.posts = self.recipients = 0
        self.first_post = self.last_post = 0.0
        self.watch_pid = 0
        self.first_post_client_cpu_s = None

    def on_first_post(self) -> None:
        """The watched client's CPU time (user + sys, every thread) as its first request arrives."""
        if self.watch_pid:
            try:
                fields = open(f"/proc/{self.watch_pid}/stat").read().rsplit(")", 1)[1].split()
                self.first_post_client_cpu_s = (int(fields[11]) + int(fields[12])) / _CLK_TCK
            except (OSError, IndexError, ValueError):
                self.first_post_client_cpu_s = None

    def as_dict(self, connections: int) -> dict[str, float | int | None]:
        return {
            "posts": self.posts,
            "recipients": self.recipients,
            "first_post": self.first_post,
            "first_post_client_cpu_s": self.first_post_client_cpu_s,
            "last_post": self.last_post,
            "cpu_s": time.process_time(),
            "now": time.monotonic(),
            "connections": connections,
        }


class ResponderProtocol(asyncio.Protocol):
    """One connection: parse requests out of the buffer, answer each at once."""

    __slots__ = ("_buf", "_counters", "_live", "_transport")

    def __init__(self, counters: Counters, live: set[ResponderProtocol]) -> None:
        self._counters = counters
        self._live = live
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._live.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._live.discard(self)
        self._transport = None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        transport = self._transport
        assert transport is not None
        out: list[bytes] = []
        close = False
        while buf:
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                if len(buf) > MAX_HEAD:
                    close = True
                    buf = b""
                break
            head = buf[:head_end]
            m = _CONTENT_LENGTH.search(head)
            length = int(m.group(1)) if m else 0
            end = head_end + 4 + length
            if len(buf) < end:
                break
            if head.startswith(b"POST "):
                c = self._counters
                now = time.monotonic()
                if not c.posts:
                    c.first_post = now
                    c.on_first_post()
                c.last_post = now
                c.posts += 1
                body = buf[head_end + 4 : end]
                if head.startswith(_SUBMAIL_PATH):
                    n = body.count(_SUBMAIL_TO)
                    out.append(_json_response(b"[" + b",".join([_SUBMAIL_ENTRY] * n) + b"]"))
                elif head.startswith(_NXCLOUD_PATH):
                    n, answer = nxcloud_answer(body)
                    out.append(_json_response(answer))
                else:
                    n = count_recipients(body)
                    out.append(OK_RESPONSE)
                c.recipients += n
            else:
                out.append(self._get(head))
            if _CONNECTION_CLOSE.search(head):
                close = True
                buf = b""
                break
            buf = buf[end:]
        self._buf = buf
        if out:
            transport.write(b"".join(out) if len(out) > 1 else out[0])
        if close:
            transport.close()

    def _get(self, head: bytes) -> bytes:
        target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"/"
        if target.startswith(b"/__reset"):
            self._counters.reset()
        elif target.startswith(b"/__watch?pid="):
            self._counters.watch_pid = int(target.split(b"=", 1)[1])
        elif target.startswith(b"/service/timestamp"):
            return _json_response(b'{"timestamp":%d}' % int(time.time()))
        body = json.dumps(self._counters.as_dict(len(self._live))).encode()
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )


async def serve(port: int) -> dict[str, float | int | None]:
    loop = asyncio.get_running_loop()
    counters = Counters()
    live: set[ResponderProtocol] = set()
    server = await loop.create_server(
        lambda: ResponderProtocol(counters, live), "127.0.0.1", port, backlog=1024, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    host, bound = server.sockets[0].getsockname()[:2]
    sys.stdout.write(f"http://{host}:{bound}\n")
    sys.stdout.flush()
    await stop.wait()
    server.close()
    for conn in list(live):
        conn.close()
    await server.wait_closed()
    return counters.as_dict(0)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.responder", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=0, help="0: a free port (the URL is printed)")
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    args = p.parse_args(argv)
    use_uvloop = not args.no_uvloop
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            use_uvloop = False
    final: dict[str, object] = dict(
        uvloop.run(serve(args.port)) if use_uvloop else asyncio.run(serve(args.port))
    )
    final["loop"] = "uvloop" if use_uvloop else "asyncio"
    sys.stderr.write(json.dumps(final) + "\n")
    sys.stderr.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
