"""Exceptions raised by the engine.

::

    SluiceError
    ├── CampaignError      a bad campaign file or option (exit 2, nothing sent)
    ├── RunDirError        a run directory that cannot be used as asked (exit 2)
    ├── SourceError        the source cannot be opened or read (exit 2 before sending)
    └── RunStopped         the run stopped before finishing (exit 4)
"""

from __future__ import annotations

__all__ = (
    "DISK_FAULT",
    "LEASE_LOST",
    "REJECT_RATIO",
    "CampaignError",
    "RunDirError",
    "RunStopped",
    "SluiceError",
    "SourceError",
)

# Stop codes of the run's own (not the provider's), each with its exit code in the CLI.
DISK_FAULT = "DiskFault"  # the run directory could not be written (exit 5)
REJECT_RATIO = "RejectRatio"  # past [limits] max_reject_ratio: the wrong file (exit 2)
LEASE_LOST = "LeaseLost"  # a shard worker's claim on its shard lapsed: it stops sending (pipeline.scale)


class SluiceError(Exception):
    """Base class of every error the engine raises on purpose."""


class CampaignError(SluiceError):
    """The campaign names an impossible or malformed setting."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"campaign field {field!r}: {problem}")
        self.field = field
        self.problem = problem


class RunDirError(SluiceError):
    """The run directory is missing, foreign, or does not match the campaign."""


class SourceError(SluiceError):
    """The source of recipients cannot be opened or read."""


class RunStopped(SluiceError):
    """The run stopped early: a whole-request provider error or the circuit breaker.

    The recipients that were not sent stay pending; a resume sends them once the
    cause is fixed.
    """

    def __init__(self, reason: str, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
