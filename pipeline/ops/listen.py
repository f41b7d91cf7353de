"""``sluice listen``: receive the providers' delivery receipts for one run over HTTP.

Served by aiohttp's web server (a maintained, pure-asyncio server with a request size limit
built in, ``client_max_size``; see the README for the measured rate). Paths, under a secret
token kept in the run directory (``listen-token``) so a restart answers the same URLs::

    /<token>/aliyun    SmsReport: a JSON array      → {"code":0,"msg":"成功"}
    /<token>/submail   SUBHOOK events (form or JSON), signature md5(token + key) checked
    /<token>/nxcloud   DR: form body or query string → success

A request to any other path is answered 404 and counted. Each receipt is matched, de-duplicated
and appended to ``receipts.jsonl`` (:mod:`pipeline.ops.receipts`); the answer that makes the
provider stop retrying leaves only after the lines were fsynced. Requests arriving during one
fsync share the next (group commit). The run's lock is not taken: ``sluice run`` writes the
ledger, this process only reads it.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import orjson
from aiohttp import web

from pipeline.admit import open_source
from pipeline.app.account import protocol_of
from pipeline.app.api import pinned_campaign
from pipeline.app.rundir import RunDir
from pipeline.ops.receipts import (
    BadReceipt,
    Journal,
    Receipt,
    RecipientIndex,
    parse_aliyun,
    parse_nxcloud,
    parse_submail,
    phone_tail,
    submail_signature_ok,
)
from pipeline.render import normalize_phone
from providers import registry

__all__ = (
    "DEFAULT_MAX_BODY",
    "GroupCommit",
    "Listener",
    "build_index",
    "make_app",
    "print_ready",
    "run_token",
    "serve_listener",
)

DEFAULT_MAX_BODY = 1 << 20
TOKEN_FILE = "listen-token"
ALIYUN_OK = orjson.dumps({"code": 0, "msg": "成功"})


def run_token(run_dir: Path) -> str:
    """The run's secret path token, created (mode 0600) on first use."""
    path = run_dir / TOKEN_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        token = secrets.token_urlsafe(18)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token


async def build_index(run_dir: Path) -> RecipientIndex:
    """Numbers (and NXCloud message ids) of every source row, and the ledger read so far."""
    rd = RunDir(run_dir)
    campaign, doc = pinned_campaign(rd, strict=False)
    nxcloud = protocol_of(campaign) == "nxcloud"
    key_col = campaign.source.key
    tails: list[int] = []
    ids: dict[str, int] = {}
    spec = registry.lookup("nxcloud") if nxcloud else None
    message_id = spec.message_id if spec is not None else None
    async for chunk in open_source(campaign).chunks():
        for row, rec in chunk:
            if row >= len(tails):
                tails.extend([0] * (row + 1 - len(tails)))
            if isinstance(rec, str):
                continue
            phone = normalize_phone(str(rec.get(campaign.source.phone, "")), campaign.source.default_country)
            if phone is not None:
                tails[row] = phone_tail(phone)
            if message_id is not None:
                key = str(rec.get(key_col, row)) if key_col else str(row)
                ids[message_id(doc["run_id"], key)] = row
    index = RecipientIndex(rd.ledger, np.asarray(tails, dtype=np.int64), ids)
    index.refresh()
    return index


class GroupCommit:
    """Waiters for "my lines are on the disk": one fsync (in a thread) covers everyone who
    buffered before it started; who buffers during it waits for the next one."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._gen = 0  # what add() buffers now is written by flush number _gen
        self._done = -1
        self._task: asyncio.Task[None] | None = None
        self.fsyncs = 0
        self.broken: BaseException | None = None

    async def commit(self) -> None:
        mine = self._gen
        while self._done < mine:
            if self.broken is not None:
                raise self.broken
            if self._task is None:
                self._task = asyncio.create_task(self._flush())
            await asyncio.shield(self._task)

    async def _flush(self) -> None:
        gen = self._gen
        self._gen += 1
        data = self._journal.take()
        try:
            await asyncio.to_thread(self._journal.write, data)
        except OSError as exc:
            # What was taken is lost from the buffer: refuse everything from now on so that
            # nothing is acknowledged unwritten (the provider retries; a restart reloads).
            self.broken = exc
            raise
        finally:
            self._task = None
        self.fsyncs += 1
        self._done = gen


@dataclass
class Listener:
    run_dir: Path
    journal: Journal
    token: str
    subhook_key: str | None
    clock: Callable[[], float] = time.time
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.group = GroupCommit(self.journal)
        self.index: RecipientIndex | None = None
        self.index_s = self.index_cpu_s = 0.0  # time to read the source and ledger for matching
        self.first_at = self.last_at = 0.0  # wall time of the first and last receipt stored
        self._indexing = asyncio.Lock()

    async def _index(self) -> RecipientIndex:
        """Built on the first receipt: the listener may start before ``sluice run`` pins the run."""
        async with self._indexing:
            if self.index is None:
                if not RunDir(self.run_dir).exists():
                    self.count("before_run")
                    raise web.HTTPServiceUnavailable(text="the run has not started")  # retried
                started, cpu = time.perf_counter(), time.process_time()
                self.index = await build_index(self.run_dir)
                self.index_s = round(time.perf_counter() - started, 3)
                self.index_cpu_s = round(time.process_time() - cpu, 3)
            return self.index

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    async def _store(self, receipts: list[Receipt]) -> None:
        index = self.index or await self._index()
        now = self.clock()
        for r in receipts:
            self.count(self.journal.add(r, index.match(r), now))
        await self.group.commit()
        self.first_at = self.first_at or now
        self.last_at = self.clock()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.count("requests")
        if not hmac.compare_digest(request.match_info["token"].encode(), self.token.encode()):
            self.count("bad_token")
            raise web.HTTPNotFound()
        provider = request.match_info["provider"]
        if provider == "__stats" and request.method == "GET":
            return web.json_response(self.stats())
        if request.method != "POST" and provider != "nxcloud":
            raise web.HTTPMethodNotAllowed(request.method, ["POST"])
        body = await request.read()  # beyond client_max_size: 413, nothing read further
        try:
            if provider == "aliyun":
                await self._store(parse_aliyun(body))
                return web.Response(body=ALIYUN_OK, content_type="application/json")
            if provider == "submail":
                return await self._submail(request, body)
            if provider == "nxcloud":
                fields = _form(body) if body else dict(request.query)
                await self._store([parse_nxcloud(fields)])
                return web.Response(text="success")
        except BadReceipt as exc:
            self.count("bad_request")
            raise web.HTTPBadRequest(text=str(exc)) from None
        except OSError:
            self.count("write_failed")
            raise web.HTTPServiceUnavailable() from None
        self.count("bad_token")  # an unknown provider name: as unknown as a wrong token
        raise web.HTTPNotFound()

    async def _submail(self, request: web.Request, body: bytes) -> web.Response:
        if request.content_type == "application/json":
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise BadReceipt(f"not JSON: {exc}") from None
            if not isinstance(data, dict):
                raise BadReceipt("a SUBHOOK event is an object")
            event = {k: str(v) for k, v in data.items()}
        else:
            event = _form(body)
        if self.subhook_key is None or not submail_signature_ok(event, self.subhook_key):
            self.count("bad_signature")
            raise web.HTTPForbidden(text="bad signature")
        receipt = parse_submail(event)
        if receipt is not None:
            await self._store([receipt])
        else:
            self.count("ignored_event")
        return web.Response(text="success")

    def stats(self) -> dict[str, Any]:
        return {
            **self.counts,
            "fsyncs": self.group.fsyncs,
            "cpu_s": round(time.process_time(), 3),
            "index_s": self.index_s,
            "index_cpu_s": self.index_cpu_s,
            "first_at": self.first_at,
            "last_at": self.last_at,
        }


def _form(body: bytes) -> dict[str, str]:
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    except UnicodeDecodeError:
        raise BadReceipt("form body is not UTF-8") from None


def make_app(listener: Listener, max_body: int) -> web.Application:
    app = web.Application(client_max_size=max_body)
    app.router.add_route("*", "/{token}/{provider}", listener.handle)

    @web.middleware
    async def count_404(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.match_info.route.resource is None:
            listener.count("requests")
            listener.count("bad_token")
        return await handler(request)  # type: ignore[no-any-return]

    app.middlewares.append(count_404)
    return app


async def serve_listener(
    run_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_body: int = DEFAULT_MAX_BODY,
    subhook_key: str | None = None,
    on_ready: Callable[[str, str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> dict[str, Any]:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT); returns the counters."""
    RunDir(run_dir).check_is_dir()
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    journal = Journal(run_dir)
    listener = Listener(run_dir, journal, run_token(run_dir), subhook_key)
    runner = web.AppRunner(make_app(listener, max_body), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    server = site._server  # the bound port when port is 0
    assert server is not None and server.sockets  # type: ignore[attr-defined]
    bound = server.sockets[0].getsockname()  # type: ignore[attr-defined]
    base = f"http://{bound[0]}:{bound[1]}" if ":" not in bound[0] else f"http://[{bound[0]}]:{bound[1]}"
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready(base, listener.token)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        journal.close()
    return listener.stats()


def print_ready(base: str, token: str) -> None:
    """First line: the base URL; then the push URL of each provider and the simulator's form."""
    lines = [base, *(f"{p} {base}/{token}/{p}" for p in ("aliyun", "submail", "nxcloud"))]
    lines.append(f"receipts-to {base}/{token}")
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
