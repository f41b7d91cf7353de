"""The run's plumbing: the campaign file (``campaign``), the run directory (``rundir``), the
provider built from them (``account``), the Python API (``api``), the ``sluice`` command (``cli``),
logging and the live progress display."""

__all__ = ()
