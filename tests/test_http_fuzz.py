"""Differential fuzzing of the transport's response parsing against h11 (the parser under httpcore).

Hypothesis builds responses (status lines, header sets, Content-Length / chunked / close
framing, an interim 100 Continue, bodies) and splits them at random byte boundaries; each goes
through sluice's connection protocol (``pipeline.transport._Connection``, fed packet by packet
as asyncio would feed it) and through h11. A well-formed one must give the same status, headers
and body; one cut short or corrupted must be a transport error, and neither may leave the
exchange waiting once every byte and the end of the connection were delivered (a hang).
Unit level: the asyncio transport under the protocol is a fake that records writes.
"""

from __future__ import annotations

import asyncio
import itertools

import h11
import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.transport import _Connection

Parsed = tuple[int, list[tuple[bytes, bytes]], bytes]

TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!~*'", min_size=1, max_size=12
)
FRAMING_HEADERS = {b"content-length", b"transfer-encoding", b"connection"}
VISIBLE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20)


@st.composite
def header_values(draw: st.DrawFn) -> bytes:
    words = draw(st.lists(VISIBLE, min_size=0, max_size=3))
    return " ".join(words).encode("ascii")


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, str]:
    """A well-formed response: (its bytes, its framing)."""
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    status = draw(st.integers(200, 599).filter(lambda s: s not in (204, 304)))
    reason = draw(st.sampled_from([b"OK", b"", b"Bad Request", b"Some reason here"]))
    names = draw(st.lists(TOKEN.map(lambda t: t.encode()), max_size=6))
    headers = [(name, draw(header_values())) for name in names if name.lower() not in FRAMING_HEADERS]
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["content-length", "chunked", "close"]))
    if framing == "chunked" and version == b"HTTP/1.0":
        framing = "content-length"  # chunked is HTTP/1.1 only
    lines = [version + b" %d " % status + reason]
    lines += [name + b": " + value for name, value in headers]
    if framing == "content-length":
        lines.append(b"Content-Length: %d" % len(body))
        payload = body
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        sizes = draw(st.lists(st.integers(1, 64), max_size=10))
        payload, at = b"", 0
        for size in sizes:
            piece = body[at : at + size]
            if not piece:
                break
            ext = draw(st.sampled_from([b"", b";a=1", b";name"]))
            payload += b"%x%s\r\n%s\r\n" % (len(piece), ext, piece)
            at += len(piece)
        if at < len(body):
            payload += b"%X\r\n%s\r\n" % (len(body) - at, body[at:])
        trailer = draw(st.sampled_from([b"", b"X-Trailer: 1\r\n"]))
        payload += b"0\r\n" + trailer + b"\r\n"
    else:
        lines.append(b"Connection: close")
        payload = body
    interim = draw(st.sampled_from([b"", b"HTTP/1.1 100 Continue\r\n\r\n"]))
    return interim + b"\r\n".join(lines) + b"\r\n\r\n" + payload, framing


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def through_sluice(packets: list[bytes], eof: bool) -> Parsed | httpx.TransportError:
    async def run() -> Parsed | httpx.TransportError:
        conn = _Connection(max_body=1 << 20)
        conn.connection_made(FakeTransport())
        exchange = asyncio.ensure_future(conn.exchange(b"POST / HTTP/1.1\r\n\r\n", None))
        await asyncio.sleep(0)  # the exchange writes its request and waits
        for packet in packets:
            if exchange.done():
                break
            conn.data_received(packet)
        if eof and not exchange.done():
            conn.eof_received()
            conn.connection_lost(None)
        await asyncio.sleep(0)
        assert exchange.done(), "every byte and the end were delivered, and the exchange still waits"
        try:
            return exchange.result()
        except httpx.TransportError as exc:
            return exc

    return asyncio.run(run())


def through_h11(packets: list[bytes], eof: bool) -> Parsed | None:
    """The response as h11 reads it, or None (malformed or incomplete)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
    conn.send(h11.EndOfMessage())
    status, headers, body = 0, [], b""
    try:
        for packet in [*packets, b""] if eof else packets:
            conn.receive_data(packet)
            while (event := conn.next_event()) is not h11.NEED_DATA:
                if isinstance(event, h11.Response):
                    status, headers = event.status_code, [(k, v) for k, v in event.headers.raw_items()]
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    return status, headers, body
                elif isinstance(event, h11.ConnectionClosed):
                    return None
    except h11.RemoteProtocolError:
        return None
    return None


def normal(parsed: Parsed) -> Parsed:
    status, headers, body = parsed
    return status, [(k.lower(), v) for k, v in headers], body


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(responses(), st.lists(st.integers(0, 10_000), max_size=12))
def test_well_formed_response_same_as_h11(response: tuple[bytes, str], cuts: list[int]) -> None:
    data, framing = response
    packets = split(data, cuts)
    eof = framing == "close"
    expected = through_h11(packets, eof)
    assert expected is not None, "the generator made a response h11 does not accept"
    got = through_sluice(packets, eof)
    assert not isinstance(got, Exception), got
    assert normal(got) == normal(expected)


@FUZZ
@given(responses(), st.lists(st.integers(0, 10_000), max_size=8), st.integers(0, 10_000))
def test_response_cut_short_is_an_error(response: tuple[bytes, str], cuts: list[int], cut: int) -> None:
    data, framing = response
    head_end = data.rfind(b"\r\n\r\n", 0, len(data) - 0) if framing == "close" else len(data)
    end = cut % (head_end if framing == "close" else len(data))  # a close-framed body has no short form
    packets = split(data[:end], cuts)
    assert through_h11(packets, eof=True) is None
    got = through_sluice(packets, eof=True)
    assert isinstance(got, httpx.TransportError), (
        f"a response cut at {end} of {len(data)} was returned: {got!r}"
    )


@FUZZ
@given(
    responses(),
    st.lists(st.integers(0, 10_000), max_size=8),
    st.integers(0, 10_000),
    st.sampled_from([b"\r", b"\n", b"\x00", b" ", b":", b"\x7f", b"\xff", b"-", b"Z", b"9"]),
)
def test_corrupted_response_is_an_error_or_what_h11_reads(
    response: tuple[bytes, str], cuts: list[int], at: int, byte: bytes
) -> None:
    data, _ = response
    head_end = data.rfind(b"\r\n\r\n") + 4
    where = at % head_end  # corrupt the head (framing included): a body byte is just data
    for status_line in (0, data.find(b"\r\n\r\nHTTP/1.") + 4):  # the interim one and the final one
        reason_at, reason_end = status_line + 13, data.find(b"\r\n", status_line)
        assume(not reason_at <= where < reason_end)  # a reason phrase is never read (llhttp lets a NUL in)
    corrupted = data[:where] + byte + data[where + 1 :]
    packets = split(corrupted, cuts)
    expected = through_h11(packets, eof=True)
    got = through_sluice(packets, eof=True)
    if isinstance(got, httpx.TransportError):
        return  # refused: what must happen to whatever cannot be read with certainty
    # accepted: then exactly as h11 reads it, never a different body, status or header set
    assert expected is not None, f"sluice accepted what h11 refuses: {corrupted!r} -> {got!r}"
    assert normal(got) == normal(expected)


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nok", id="bare-cr-in-value"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok", id="nul-in-value"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-6\r\nabcdef\r\n0\r\n\r\n", id="-6"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", id="two-lengths"
        ),
    ],
)
def test_known_bad_responses_are_errors(reply: bytes) -> None:
    got = through_sluice([reply], eof=True)
    assert isinstance(got, httpx.RemoteProtocolError), got
