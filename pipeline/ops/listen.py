"""``sluice listen``: receive the providers' delivery receipts for one run over HTTP.

Served by aiohttp's web server (a maintained, pure-asyncio server with a request size limit
built in, ``client_max_size``; see the README for the measured rate). Paths, under a secret
token kept in the run directory (``listen-token``) so a restart answers the same URLs:
``/<token>/<path>`` for each receipt push a registered provider declares
(``ProviderKind.receipts``: its path, methods, parser, signing key and answer).

A request to any other path is answered 404 and counted. A push the provider's parser finds
malformed is answered 400, one whose signature does not verify 403, one that settles no
message is answered and counted as ignored. Each receipt is matched, de-duplicated
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from pipeline.admit import open_source
from pipeline.app.account import protocol_of
from pipeline.app.api import pinned_campaign
from pipeline.app.rundir import RunDir
from pipeline.ops.receipts import Journal, RecipientIndex, phone_tail
from pipeline.render import normalize_phone
from providers import registry
from providers.spec import BadReceipt, BadSignature, PushRequest, Receipt, ReceiptPush

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
POST_ONLY = frozenset({"POST"})  # what an unknown path allows


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
    """Numbers of every source row (and the message ids sluice chose, for a provider that
    declares them), and the ledger read so far."""
    rd = RunDir(run_dir)
    campaign, doc = pinned_campaign(rd, strict=False)
    key_col = campaign.source.key
    tails: list[int] = []
    ids: dict[str, int] = {}
    spec = registry.lookup(protocol_of(campaign))
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
    cuts = tuple(sorted({p.batch_ref_chars for p in registry.receipt_pushes().values() if p.batch_ref_chars}))
    index = RecipientIndex(rd.ledger, np.asarray(tails, dtype=np.int64), ids, cuts)
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
    keys: Mapping[str, str]  # push path → the key its pushes are signed with (where set)
    pushes: Mapping[str, ReceiptPush] = field(default_factory=registry.receipt_pushes)
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
        path = request.match_info["path"]
        if path == "__stats" and request.method == "GET":
            return web.json_response(self.stats())
        push = self.pushes.get(path)
        methods = POST_ONLY if push is None else push.methods
        if methods is not None and request.method not in methods:
            raise web.HTTPMethodNotAllowed(request.method, sorted(methods))
        body = await request.read()  # beyond client_max_size: 413, nothing read further
        if push is None:
            self.count("bad_token")  # an unknown path: as unknown as a wrong token
            raise web.HTTPNotFound()
        pushed = PushRequest(request.method, body, request.content_type, request.query, request.headers)
        try:
            receipts = push.parse(pushed, self.keys.get(path))
            if receipts:
                await self._store(receipts)
            else:
                self.count("ignored_event")
        except BadSignature as exc:
            self.count("bad_signature")
            raise web.HTTPForbidden(text=str(exc)) from None
        except BadReceipt as exc:
            self.count("bad_request")
            raise web.HTTPBadRequest(text=str(exc)) from None
        except OSError:
            self.count("write_failed")
            raise web.HTTPServiceUnavailable() from None
        return web.Response(body=push.answer, headers={"Content-Type": push.answer_type})

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


def make_app(listener: Listener, max_body: int) -> web.Application:
    app = web.Application(client_max_size=max_body)
    app.router.add_route("*", "/{token}/{path}", listener.handle)

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
    key_env: str | None = None,
    environ: Mapping[str, str] | None = None,
    on_ready: Callable[[str, str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> dict[str, Any]:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT); returns the counters.

    Each push that is signed is checked with the key in the environment variable its provider
    declares (``ReceiptPush.key_env``), or in ``key_env`` when given."""
    RunDir(run_dir).check_is_dir()
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    journal = Journal(run_dir)
    environ = os.environ if environ is None else environ
    keys: dict[str, str] = {}
    for path, push in registry.receipt_pushes().items():
        name = (key_env or push.key_env) if push.key_env else None
        if name is not None and name in environ:
            keys[path] = environ[name]
    listener = Listener(run_dir, journal, run_token(run_dir), keys)
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
    """First line: the base URL; then the URL of each receipt push and the simulator's form."""
    lines = [base, *(f"{p} {base}/{token}/{p}" for p in registry.receipt_pushes())]
    lines.append(f"receipts-to {base}/{token}")
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
