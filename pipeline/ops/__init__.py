"""What an operator runs around a send: ``summary`` (``sluice status`` and ``export``),
``report``, ``reconcile`` (settle unknown recipients), ``dryrun``, and delivery receipts
(``listen`` for pushes, ``receipts`` for what they say, ``receipts_pull`` for the status APIs)."""

__all__ = ()
