"""The journal's note of where the user's newest run is: a bound for the checkpoint read.

Why: a turn starts by reading the user's newest checkpoint (the run to resume,
or the base of a new one).  Sorting every run the user ever had grew with its
history -- a 24/7 user opens a run for each few new SMS, and at 20,000 runs the
sort cost the MongoDB-wire server 0.6 s per turn (neither server serves the
``(checkpoint_timestamp, _id)`` order from the index with a limit).  Any run's
``checkpoint_timestamp`` is a lower bound of the newest's (a run's timestamp
only moves forward, ``$max``), so the read asks only for the runs since the one
this host last started or resumed, an index range (:func:`smsd.store_docs.latest_run`).

The note lives in the user's journal (its ``meta`` table), which every turn opens
anyway: no MongoDB command is added.  A missing note (a new journal, another
host's first turn) reads every run, once.  A note older than another host's
runs only widens the range.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

#: The ``meta`` key of the note.
KEY = "latest_run_at"


def latest_run_at(journal: Any) -> datetime | None:
    """The ``checkpoint_timestamp`` this journal last noted, or ``None``."""
    value = journal.meta(KEY)
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None   # unreadable: read every run, and note a good one


def note_run(journal: Any, checkpoint: dict | None) -> None:
    """Note ``checkpoint``'s timestamp (the run this turn works on); one commit when it changed."""
    at = (checkpoint or {}).get("checkpoint_timestamp")
    if not isinstance(at, datetime):
        return
    # As MongoDB stores it (milliseconds): a document written from this dict is found again.
    at = at.replace(microsecond=at.microsecond // 1000 * 1000)
    journal.set_meta(KEY, at.isoformat())
