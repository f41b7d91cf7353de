"""Dispatch: send batches over one HTTP transport with retries, and record outcomes.

For each attempt: wait for the rate limiter, sign, write the intent to the
ledger, send, classify, then write the outcome. Retries (with exponential
backoff and full jitter) happen only where the request provably was not
processed: connect errors, throttling, signature or timestamp rejections.
Everything ambiguous becomes ``unknown`` and is never re-sent silently.
A call refused whole because of some of its recipients (``Outcome.SPLIT``) sent
nothing: its parts are sent as batches of their own until the recipients at
fault stand alone (``on_refusal = "split"``), or every recipient of it is
failed (``"fail-batch"``).
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import httpx
import structlog

from pipeline.app.account import sync_server_clock
from pipeline.app.campaign import ON_REFUSAL
from pipeline.errors import LEASE_LOST, RunStopped, SluiceError
from pipeline.ledger import LedgerFault, LedgerWriter
from pipeline.limit import Governor
from pipeline.schedule import SendGate
from pipeline.transport import WireTransport, wire_transport
from providers.base import (
    CONNECT_CODES,
    Batch,
    BatchOutcome,
    Message,
    Outcome,
    Provider,
    Response,
    WireRequest,
    classify_transport_error,
)

__all__ = ("CircuitBreaker", "Dispatcher", "EndpointGuard", "RetryPolicy", "server_clock")

log = structlog.get_logger("sluice.dispatch")


class CircuitBreaker:
    """Trips when too many of the last ``window`` batches ended unknown or deferred.

    A provider that times out or fails half the requests is not one to keep
    feeding millions of recipients: each ambiguous batch is a batch that cannot
    be safely re-sent. Tripping stops the run cleanly (exit 4); a resume goes on.
    """

    def __init__(self, window: int = 50, threshold: float = 0.5) -> None:
        self._outcomes: deque[bool] = deque(maxlen=window)
        self._bad = 0
        self.threshold = threshold

    def record(self, bad: bool) -> bool:
        """Record one batch's outcome; True when the breaker trips."""
        if len(self._outcomes) == self._outcomes.maxlen and self._outcomes[0]:
            self._bad -= 1
        self._outcomes.append(bad)
        self._bad += bad
        full = len(self._outcomes) == self._outcomes.maxlen
        return self.threshold > 0 and full and self._bad >= self.threshold * len(self._outcomes)

    def describe(self) -> str:
        return (
            f"circuit breaker: {self._bad} of the last {len(self._outcomes)} batches were unknown or deferred"
        )


class EndpointGuard:
    """Stops the run when the endpoint cannot be connected to.

    After a failed connect one batch, the *prober*, retries with the usual backoff
    while the other workers' batches wait unsent (neither retried nor deferred). Any
    response, or any error after connecting, ends the wait. ``limit`` failed probes in
    a row (the first failure included) stop the run, naming the endpoint and the OS
    error; the recipients stay pending. At most ``concurrency`` + ``limit`` - 1 connects
    are attempted: the requests already on their way when the first one failed, and the
    probes.
    """

    def __init__(self, limit: int = 5) -> None:
        self.limit = limit
        self.failures = 0  # failed probes in a row; 0 while the endpoint answers
        self._prober: Batch | None = None
        self._up = anyio.Event()
        self._up.set()

    async def wait_turn(self, batch: Batch) -> None:
        """Return when ``batch`` may be sent: the endpoint answers, or it is the prober."""
        while not self._up.is_set():
            if self._prober is None:
                self._prober = batch  # the prober's batch settled elsewhere: take over
            if self._prober is batch:
                return
            await self._up.wait()

    def reached(self) -> None:
        """A connection was made: the endpoint is up."""
        if not self._up.is_set():
            self._prober = None
            self.failures = 0
            self._up.set()

    def failed(self, batch: Batch) -> bool | None:
        """One failed connect: True to back off and probe again (``batch`` is the prober),
        False to wait for the prober, None when the limit is reached (stop the run)."""
        if self._up.is_set():
            self._up = anyio.Event()
            self._prober = batch
        elif self._prober is None:
            self._prober = batch
        if self._prober is not batch:
            return False  # on its way before the first failure was seen: not a probe
        self.failures += 1
        return None if self.failures >= self.limit else True

    def release(self, batch: Batch) -> None:
        """``batch`` is settled (or abandoned) without reaching the endpoint: another may probe."""
        if self._prober is batch:
            self._prober = None


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff_base: float = 0.2
    backoff_max: float = 30.0
    max_throttles: int = 50  # throttles are not failures, but are bounded too

    def backoff(self, attempt: int, rng: random.Random) -> float:
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        return rng.uniform(ceiling / 2, ceiling)


class Dispatcher:
    """Sends one batch at a time per worker; all workers share this object."""

    def __init__(
        self,
        *,
        provider: Provider,
        transport: httpx.AsyncBaseTransport | WireTransport,
        timeout: httpx.Timeout,
        ledger: LedgerWriter,
        governor: Governor,
        policy: RetryPolicy,
        run_id: str,
        on_fatal: Callable[[BatchOutcome], None],
        rng: random.Random | None = None,
        breaker: CircuitBreaker | None = None,
        gate: SendGate | None = None,
        endpoint: EndpointGuard | None = None,
        batch_ids: Callable[[], int],
        on_refusal: str = "split",
        fence: Callable[[], bool] | None = None,
    ) -> None:
        if on_refusal not in ON_REFUSAL:
            raise ValueError(f"on_refusal must be one of {', '.join(ON_REFUSAL)}, not {on_refusal!r}")
        self._provider = provider
        self._transport = wire_transport(transport)
        self._timeout = timeout
        self._ledger = ledger
        self._governor = governor
        self._policy = policy
        self._run_id = run_id
        self._on_fatal = on_fatal
        self._rng = rng or random.Random()
        self._breaker = breaker or CircuitBreaker(threshold=0)
        self._endpoint = endpoint or EndpointGuard()
        self.gate = gate
        self._stopping = False
        self.requests = 0
        self.retries = 0
        self._batch_ids = batch_ids  # the run's batch ids, for the parts of a split batch
        self.on_refusal = on_refusal
        self._fence = fence  # False once this process may no longer send for its shard
        self._pacing: set[anyio.CancelScope] = set()  # workers waiting on the governor
        self.splits = 0  # refused calls that were split
        self.split_requests = 0  # requests sent for their parts (included in requests)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self._stopping = value
        if value:
            for pacing in self._pacing:
                pacing.cancel()
            if self.gate is not None:
                self.gate.abort()  # a request waiting for the window or the cap is not sent
            self._endpoint.reached()  # batches waiting for a prober go on, and see the stop

    async def _attempt(self, batch: Batch) -> tuple[BatchOutcome, float]:
        request = self._provider.build_wire(batch)
        await self._ledger.record_intent(batch)  # on the disk first with durability = "batch"
        started = time.perf_counter()
        self.requests += 1
        self.split_requests += batch.parent is not None
        try:
            response = await self._send(request)
        except httpx.TransportError as exc:
            result = classify_transport_error(exc)
        else:
            try:
                result = self._provider.parse_response(batch, response)
            except Exception as exc:  # a provider bug must not lose the batch
                log.error("parse_failed", batch=batch.id, error=repr(exc))
                result = BatchOutcome(Outcome.UNKNOWN, code="ParseError")
        return result, (time.perf_counter() - started) * 1000

    async def _send(self, request: WireRequest) -> Response:
        # One path: HttpTransport in production, a fake or an adapted httpx transport in tests.
        return await self._transport.send(request, self._timeout)

    async def send(self, batch: Batch) -> Outcome | None:
        """Send ``batch`` until it has an outcome (or the run is stopping).

        Returns ``Outcome.SPLIT`` when the provider refused it because of some of its recipients.
        """
        policy = self._policy
        failures = throttles = connects = 0
        result: BatchOutcome | None = None
        if self.gate is not None and batch.parent is None:  # a split's parts were let through whole
            await self.gate.wait(len(batch.messages))  # send window and daily cap
        while True:
            await self._endpoint.wait_turn(batch)
            with anyio.CancelScope() as pacing:  # a stop ends the wait (a limiter that is down)
                self._pacing.add(pacing)
                try:
                    await self._governor.acquire(len(batch.messages))
                finally:
                    self._pacing.discard(pacing)
            if self.stopping:
                self._endpoint.release(batch)
                return None  # never sent: the rows stay pending
            if self._fence is not None and not self._fence():  # checked next to the write
                self._endpoint.release(batch)
                lapsed = BatchOutcome(Outcome.FATAL, code=LEASE_LOST, message="the shard's lease lapsed")
                self._on_fatal(lapsed)
                return None
            batch.attempt = failures + throttles + connects + 1
            batch.out_id = f"{self._run_id}-{batch.id}-{batch.attempt}"
            try:
                result, ms = await self._attempt(batch)
            except anyio.get_cancelled_exc_class():
                # Stopped past the deadline with the request in flight.
                self._ledger.unknown_rows((m.row for m in batch.messages), "Stopped")
                raise
            except LedgerFault:
                self._endpoint.release(batch)
                return None  # the intent could not be written, so nothing was sent; the run is stopping
            kind = result.outcome
            if kind is Outcome.RETRY and result.code in CONNECT_CODES:
                connects += 1
                if await self._connect_failed(batch, result, ms):
                    continue
                return None
            self._endpoint.reached()
            if kind is Outcome.THROTTLED:
                throttles += 1
                self._governor.throttled(result.retry_after)
                self._ledger.attempt(batch, result, "throttled", ms)
                log.info("provider_throttled", batch=batch.id, code=result.code)
                if throttles < policy.max_throttles:
                    continue
            elif kind is Outcome.RETRY:
                failures += 1
                self._ledger.attempt(batch, result, "retry", ms)
                if failures < policy.max_attempts:
                    self.retries += 1
                    delay = policy.backoff(failures, self._rng)
                    log.info("batch_retry", batch=batch.id, code=result.code, delay=round(delay, 3))
                    await anyio.sleep(delay)
                    continue
            elif kind is Outcome.FATAL:
                self._ledger.attempt(batch, result, "fatal", ms)
                self._on_fatal(result)
                return None
            elif kind is Outcome.SPLIT:
                return await self._refused(batch, result, ms)
            else:
                if kind is Outcome.SENT:
                    self._governor.succeeded()
                elif kind is not Outcome.FAILED:
                    log.warning("batch_" + kind.value, batch=batch.id, code=result.code)
                self._ledger.outcome(batch, result, ms)
                self._settled(kind in (Outcome.UNKNOWN, Outcome.DEFER))
                return None
            # The retry budget is spent on a retryable error: defer.
            deferred = BatchOutcome(Outcome.DEFER, code=result.code, message=result.message)
            self._ledger.outcome(batch, deferred, 0.0)
            log.warning("batch_deferred", batch=batch.id, code=result.code)
            self._settled(True)
            return None

    async def _refused(self, batch: Batch, result: BatchOutcome, ms: float) -> Outcome:
        """``batch`` was refused whole because of some of its recipients: nothing of it was sent."""
        alone = result.extra.get("alone")  # what a recipient refused alone is (failed, or deferred)
        kind = alone if isinstance(alone, Outcome) else Outcome.FAILED
        if len(batch.messages) == 1 or self.on_refusal == "fail-batch":
            judged = BatchOutcome(kind, code=result.code, message=result.message, extra=result.extra)
            self._ledger.outcome(batch, judged, ms)
            self._settled(kind is not Outcome.FAILED)
            return Outcome.SPLIT
        self.splits += 1
        self._ledger.attempt(batch, result, "split", ms)
        log.info("batch_split", batch=batch.id, code=result.code, recipients=len(batch.messages))
        if batch.parent is None:  # a refused part is searched by the split that sent it
            await self._send_parts(batch)
        return Outcome.SPLIT

    async def _send_parts(self, batch: Batch) -> None:
        """Send the refused ``batch`` in parts until the recipients at fault stand alone.

        A binary search that puts the untested aside: a group known to hold a fault is halved
        and its first half sent. Refused, that half is searched next and the second half put
        aside (it may hold no fault); accepted, the fault is in the second half, searched without
        being sent whole. A recipient left alone is sent alone, and its refusal fails it. Then
        all that was put aside goes in one request, searched the same way if refused. So one
        fault costs a request per halving plus about two, and a recipient is failed only by a
        refusal of a call holding it alone: a wrong guess costs requests, never a good recipient.
        Each part is a batch of its own (id, intent, out_id, retries, the rate limiter).
        """
        group, aside = batch.messages, list[Message]()
        while not self.stopping:
            while len(group) > 1 and not self.stopping:
                half = len(group) // 2
                if await self._send_part(batch, group[:half]) is Outcome.SPLIT:
                    aside += group[half:]
                    group = group[:half] if half > 1 else []  # alone and refused: failed already
                else:
                    group = group[half:]
            if len(group) == 1:
                await self._send_part(batch, group)  # presumed at fault: its own call says
            group, aside = aside, []
            if not group or await self._send_part(batch, group) is not Outcome.SPLIT or len(group) == 1:
                return

    async def _send_part(self, parent: Batch, messages: list[Message]) -> Outcome | None:
        if self.stopping:
            return None  # never sent: the rows stay pending
        return await self.send(Batch(self._batch_ids(), messages, parent=parent.id))

    async def _connect_failed(self, batch: Batch, result: BatchOutcome, ms: float) -> bool:
        """A connect that failed: True to send ``batch`` again, False when the run stops."""
        probe = self._endpoint.failed(batch)
        if probe is None:
            self._endpoint.release(batch)
            n = self._endpoint.failures
            reason = f"{n} failed connects in a row: {result.message or result.code}"
            stop = BatchOutcome(Outcome.FATAL, code=result.code, message=reason)
            self._ledger.attempt(batch, stop, "fatal", ms)
            log.error("endpoint_unreachable", batch=batch.id, failures=n, error=result.message)
            self._on_fatal(stop)
            return False
        self._ledger.attempt(batch, result, "retry", ms)
        if probe:
            delay = self._policy.backoff(self._endpoint.failures, self._rng)
            log.info("connect_failed", batch=batch.id, error=result.message, delay=round(delay, 3))
            self.retries += 1
            await anyio.sleep(delay)
        return True

    def _settled(self, bad: bool) -> None:
        if self._breaker.record(bad) and not self.stopping:
            self._on_fatal(
                BatchOutcome(Outcome.FATAL, code="CircuitBreaker", message=self._breaker.describe())
            )


async def server_clock(
    provider: Provider,
    transport: httpx.AsyncBaseTransport,
    writer: LedgerWriter,
    tries: int,
    policy: RetryPolicy,
) -> float | None:
    """:func:`sync_server_clock` under the endpoint's stop rules (:class:`EndpointGuard`):
    a certificate not accepted stops at once, failed connects after ``tries`` in a row with backoff.
    The stop is a fatal line in the ledger (batch 0, never a real one) for ``sluice status``."""
    rng = random.Random()
    for attempt in range(1, tries + 1):
        try:
            return await sync_server_clock(provider, transport)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            stop = classify_transport_error(exc)
            if stop.outcome is Outcome.FATAL:
                break
            if attempt == tries:
                stop.message = f"{tries} failed connects in a row: {stop.message}"
                break
            await anyio.sleep(policy.backoff(attempt, rng))
        except (httpx.TransportError, ValueError) as exc:
            raise SluiceError(f"cannot read {provider.name}'s server time: {exc!r}") from None
    stop.outcome = Outcome.FATAL
    writer.attempt(Batch(0, []), stop, "fatal", 0.0)
    reason = f"{stop.code}: {stop.message}"
    log.warning("run_stopping", reason=reason, code=stop.code)
    raise RunStopped(reason, stop.code)
