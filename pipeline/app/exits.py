"""The ``sluice`` command's exit codes (README: "Exit codes")."""

from __future__ import annotations

import signal

__all__ = (
    "EXIT_DISK",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_STOPPED",
    "EXIT_UNSETTLED",
    "EXIT_USAGE",
    "SIGNAL_EXIT",
)

EXIT_OK = 0  # every recipient settled, none unknown or deferred
EXIT_ERROR = 1  # an unexpected error (a bug)
EXIT_USAGE = 2  # a bad campaign file, option, source or run directory: nothing (more) sent
EXIT_UNSETTLED = 3  # finished, some recipients unknown or deferred
EXIT_STOPPED = 4  # the provider refused the whole request, or the endpoint could not be used
EXIT_DISK = 5  # the run directory could not be written
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
