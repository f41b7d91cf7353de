"""The ledger: the append-only JSONL record of every recipient's fate; this package owns its format.

Line shapes (short keys: these lines are most of a run's I/O)::

    {"ledger":2}                                                            the format's version (first line)
    {"i":7,"a":1,"o":"3f9c2a1b-7-1","r":[11,12,...],"t":1700000000.1}   intent: batch 7, attempt 1
    {"b":7,"a":1,"s":"sent","c":"OK","id":"9006^0","ms":41.2,"t":...}      what the attempt came to
    {"b":8,"a":1,"s":"throttled","c":"Throttling.User","ms":3.1,"t":...}   sent again after a pause
    {"i":12,"a":1,"o":"3f9c2a1b-12-1","r":[11,...],"p":7,"t":...}          a part of refused batch 7
    {"r":11,"s":"sent","b":7,"k":"cust-11"}                                one line per recipient
    {"r":3,"s":"rejected","k":"cust-3","e":"invalid phone number ..."}
    {"r":12,"s":"failed","b":7,"c":"Failure","e":"Incorrect phone number format"}   the provider's reason
    {"eof":1000000}                                                         the source ended with N rows

Format 1 (ledgers written before the version line) has no version line and writes throttles as
``retry``; it is read as before and appended to in format 1. An intent is written (to the OS, and
fsynced if the durability mode asks) before the request leaves. A recipient whose last word is an
intent with no result is ``unknown`` on replay: the process died while its request was in flight.
The last recipient line for a row wins (a resumed ``deferred`` row becomes ``sent``). ``k`` is
omitted when the key is the row number.

Modules: :mod:`~pipeline.ledger.format` (the version line, statuses, line starts),
:mod:`~pipeline.ledger.writer` (appends, durability), :mod:`~pipeline.ledger.state` (a status per
row and :func:`replay`, the resume's fast path), :mod:`~pipeline.ledger.readers` (typed events and
final states, for the operator tools).
"""

from __future__ import annotations

from pipeline.ledger.format import VERSION, LedgerVersionError
from pipeline.ledger.readers import (
    Attempt,
    Eof,
    Event,
    FinalState,
    Header,
    Intent,
    Recipient,
    events,
    final_outcomes,
    final_states,
    follow,
)
from pipeline.ledger.state import LedgerState, Status, StatusArray, replay
from pipeline.ledger.writer import Durability, LedgerFault, LedgerWriter

__all__ = (
    "VERSION",
    "Attempt",
    "Durability",
    "Eof",
    "Event",
    "FinalState",
    "Header",
    "Intent",
    "LedgerFault",
    "LedgerState",
    "LedgerVersionError",
    "LedgerWriter",
    "Recipient",
    "Status",
    "StatusArray",
    "events",
    "final_outcomes",
    "final_states",
    "follow",
    "replay",
)
