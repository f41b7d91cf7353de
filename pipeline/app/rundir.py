"""Run directory: ``run.json`` (the pinned campaign), ``ledger.jsonl``, ``log.jsonl``,
``checkpoint.json`` (how long the ledger was last seen), ``sessions.jsonl`` (how each run or
resume ended) and ``run.lock`` (who runs it).

The directory and its files are created readable by the owner only: the ledger
and the log hold personal data (keys, row numbers, provider ids).

One process writes a run directory at a time: :meth:`RunDir.lock` takes an
exclusive ``flock`` on ``run.lock`` that the kernel drops when the process dies
(a SIGKILL leaves no stale lock). ``run.json`` carries a seal, a hash of the rest
of it, so an edit by hand is caught; ``checkpoint.json`` lets a resume tell a
ledger that was deleted or cut short from one that was never written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from pipeline.errors import RunDirError

__all__ = ("LockHolder", "RunDir", "write_json_atomic")

FORMAT = 2
_FORMATS = (1, 2)  # format 1: no seal and no checkpoint (runs started before both existed)
_HELD: set[Path] = set()  # run directories this process holds


def write_json_atomic(path: Path, doc: dict[str, Any], *, sync: bool = False) -> None:
    """Replace ``path`` with ``doc`` as a whole: a reader sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        data = orjson.dumps(doc, option=orjson.OPT_INDENT_2)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _seal(doc: dict[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != "seal"}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


class _Retake:
    """Takes the flock on ``fd`` once a superseded holder lets go of it (polled: a thread blocked
    in flock could not be woken to stop)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.taken = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="run-lock-retake", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(0.2):
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            except OSError:
                return
            self.taken = True
            return

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run directory's lock, as it wrote itself into ``run.lock``."""

    pid: int | None
    host: str
    since: float | None
    command: str
    epoch: int | None = None  # a shard worker's claim (pipeline.scale.claims)

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since)) if self.since else "?"
        return f"pid {self.pid} on {self.host} since {when} ({self.command})"


@dataclass
class RunDir:
    path: Path

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def ledger(self) -> Path:
        return self.path / "ledger.jsonl"

    @property
    def log(self) -> Path:
        return self.path / "log.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.json"

    @property
    def sessions(self) -> Path:
        return self.path / "sessions.jsonl"

    @property
    def lock_file(self) -> Path:
        return self.path / "run.lock"

    def exists(self) -> bool:
        return self.run_json.exists()

    def check_is_dir(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path} is a file, not a run directory")

    # -- the lock -----------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, command: str, *, epoch: int | None = None) -> Iterator[None]:
        """Hold the run directory for this process, or raise RunDirError naming the holder.

        The lock is an ``flock`` on ``run.lock``: released by the kernel when the
        process ends however it ends. It excludes processes on one machine; on a
        network filesystem (NFS, SMB) whether two machines exclude each other depends
        on the filesystem and its mount options (README: "Run directories").

        ``epoch``: a shard worker's claim (``sluice worker``), for which the claim's epoch, not the
        flock, is what excludes. A holder that wrote a lower epoch was superseded: its lease
        expired before this epoch was issued, so its fence keeps it from sending, but it may still
        be alive (frozen: SIGSTOP, a long pause) and hold the flock. The newer claim then goes on
        without the flock and takes it, in a background thread, once the old holder is gone; a
        holder without an epoch (``sluice resume`` by hand) or with a higher one is refused.
        """
        self.check_is_dir()
        held = self.path.resolve()
        if held in _HELD:  # this process holds it already (the CLI, then the API it calls)
            yield
            return
        old_umask = os.umask(0o077)
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise RunDirError(f"cannot use {self.path} as a run directory: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        try:
            superseded: _Retake | None = None
            # A reader probing the lock holds it for microseconds: a few tries ride over that.
            for attempt in range(5):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if attempt == 4:
                        holder = self.holder()
                        old_epoch = holder.epoch if holder is not None else None
                        if epoch is not None and old_epoch is not None and old_epoch < epoch:
                            superseded = _Retake(fd)
                            break
                        who = holder.describe() if holder else "another process"
                        raise RunDirError(
                            f"{self.path} is in use by {who}: wait for it to finish or stop it "
                            "(a second process on one run directory would send twice)"
                        ) from None
                    time.sleep(0.02)
            if superseded is None:
                self._refuse_live_worker(epoch)
            info: dict[str, Any] = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": round(time.time(), 3),
                "command": command,
            }
            if epoch is not None:
                info["epoch"] = epoch
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, orjson.dumps(info) + b"\n", 0)
            except OSError as exc:
                raise RunDirError(f"cannot write {self.lock_file}: {exc.strerror}") from None
            _HELD.add(held)
            try:
                yield
            finally:
                _HELD.discard(held)
                if superseded is not None:
                    superseded.stop()
                if epoch is not None and (superseded is None or superseded.taken):
                    with contextlib.suppress(OSError):  # gone: no longer names a live worker
                        os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # releases the lock

    def _refuse_live_worker(self, epoch: int | None) -> None:
        """The flock is this process's, but ``run.lock`` may name a shard worker going on without
        it (one that superseded a frozen holder, whose flock has just gone): the directory is
        still in use while that process lives, unless this claim's epoch is newer. Checked on
        this host only (another host's process cannot be asked)."""
        recorded = self.holder()  # the flock is held (by us): this reads who wrote run.lock last
        if recorded is None or recorded.epoch is None or recorded.pid in (None, os.getpid()):
            return
        if recorded.host != socket.gethostname() or (epoch is not None and recorded.epoch < epoch):
            return
        try:
            os.kill(recorded.pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass  # alive, another user's
        raise RunDirError(
            f"{self.path} is in use by {recorded.describe()}: wait for it to finish or stop it "
            "(a second process on one run directory would send twice)"
        )

    def holder(self) -> LockHolder | None:
        """The process holding the lock now, or None when nobody does (read without taking it)."""
        try:
            fd = os.open(self.lock_file, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # held: read who holds it
            except OSError:
                return None
            else:
                return None  # nobody holds it (closing the fd releases the probe)
            raw = os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
        try:
            info = orjson.loads(raw)
        except orjson.JSONDecodeError:
            info = {}
        if not isinstance(info, dict):
            info = {}
        epoch = info.get("epoch")
        return LockHolder(
            pid=info.get("pid"),
            host=str(info.get("host", "?")),
            since=info.get("since"),
            command=str(info.get("command", "?")),
            epoch=epoch if isinstance(epoch, int) else None,
        )

    # -- run.json -----------------------------------------------------------
    def create(self, campaign: dict[str, Any], digest: str, source: dict[str, Any]) -> dict[str, Any]:
        """Pin a new run; returns the run.json document."""
        old_umask = os.umask(0o077)
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            doc = {
                "format": FORMAT,
                "run_id": secrets.token_hex(4),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "campaign_hash": digest,
                "campaign": campaign,
                "source": source,
            }
            self.save(doc)
            write_json_atomic(self.checkpoint, {"ledger_bytes": 0})
        except OSError as exc:
            raise RunDirError(f"cannot create {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        return doc

    def save(self, doc: dict[str, Any]) -> None:
        """Write run.json, sealed."""
        doc = {k: v for k, v in doc.items() if k != "seal"}
        doc["seal"] = _seal(doc)
        write_json_atomic(self.run_json, doc, sync=True)

    def load(self, *, strict: bool = True) -> dict[str, Any]:
        """run.json; ``strict``: refuse one whose seal does not match (edited by hand)."""
        self.check_is_dir()
        try:
            doc: dict[str, Any] = orjson.loads(self.run_json.read_bytes())
        except FileNotFoundError:
            raise RunDirError(f"{self.path} is not a sluice run directory (no run.json)") from None
        except OSError as exc:
            raise RunDirError(f"cannot read {self.run_json}: {exc.strerror}") from None
        except orjson.JSONDecodeError as exc:
            raise RunDirError(f"{self.run_json} is corrupt: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") not in _FORMATS:
            fmt = doc.get("format") if isinstance(doc, dict) else None
            raise RunDirError(f"{self.run_json}: unsupported format {fmt!r}")
        if strict and doc["format"] >= 2 and doc.get("seal") != _seal(doc):
            raise RunDirError(
                f"{self.run_json} was changed after the run started (its seal does not match): "
                "the run must go on with the campaign and source it was started with; put the file "
                "back, or start a new run directory for a changed campaign"
            )
        return doc

    # -- the ledger's recorded length ----------------------------------------
    def recorded_ledger_bytes(self, doc: dict[str, Any]) -> int | None:
        """The ledger's length when it was last flushed (None: a format-1 run, not recorded)."""
        if doc.get("format", 1) < 2:
            return None
        try:
            raw = self.checkpoint.read_bytes()
        except FileNotFoundError:
            raise RunDirError(
                f"{self.checkpoint} is missing, so sluice cannot tell whether the ledger is whole; "
                "--force would take the ledger as it is"
            ) from None
        except OSError as exc:
            raise RunDirError(f"cannot read {self.checkpoint}: {exc.strerror}") from None
        try:
            value = orjson.loads(raw).get("ledger_bytes")
        except (orjson.JSONDecodeError, AttributeError):
            value = None
        if not isinstance(value, int) or value < 0:
            raise RunDirError(f"{self.checkpoint} is corrupt; --force would take the ledger as it is")
        return value

    def check_ledger(self, doc: dict[str, Any], *, force: bool) -> None:
        """Refuse a ledger that was deleted or cut short since it was last flushed.

        A SIGKILL never makes the ledger shorter than its checkpoint (the checkpoint is
        written after the bytes it counts); a torn last line is longer, and repaired.
        """
        try:
            recorded = self.recorded_ledger_bytes(doc)
        except RunDirError:
            if force:
                return
            raise
        if recorded is None or recorded == 0:
            return
        try:
            size = self.ledger.stat().st_size
        except FileNotFoundError:
            size = -1
        except OSError as exc:
            raise RunDirError(f"cannot read {self.ledger}: {exc.strerror}") from None
        if size >= recorded or force:
            return
        what = "is missing" if size < 0 else f"holds {size:,} bytes"
        raise RunDirError(
            f"{self.ledger} {what}, but the run had written {recorded:,} bytes to it: the record of "
            "recipients already sent is gone. A resume now would send them again. Restore the ledger "
            "(from a backup); --force would go on with the ledger as it is and re-send every "
            "recipient it no longer records"
        )

    def record_ledger_bytes(self, size: int) -> None:
        write_json_atomic(self.checkpoint, {"ledger_bytes": size})

    def record_session(self, session: dict[str, Any]) -> None:
        """Append how one run or resume ended (``sessions.jsonl``: status reads the stop and the
        rates of each session from it). Best effort: the ledger is the record of what was sent."""
        try:
            fd = os.open(self.sessions, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # owner only
            try:
                os.write(fd, orjson.dumps(session) + b"\n")
            finally:
                os.close(fd)
        except OSError:
            pass

    def load_sessions(self) -> list[dict[str, Any]]:
        """Every session recorded, oldest first (a torn last line is skipped)."""
        out: list[dict[str, Any]] = []
        try:
            lines = self.sessions.read_bytes().splitlines()
        except OSError:
            return out
        for line in lines:
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(doc, dict):
                out.append(doc)
        return out
