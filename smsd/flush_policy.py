"""When a pipeline flushes: gather answered SMS into fewer, bigger flushes.

A flush costs about the same number of MongoDB commands whether it writes one
call's answer or a page of them (bulk upsert, ``update_many``, checkpoint,
cache fill, costs), and the MongoDB-wire server's time per command is what
bounds smsd.  So while calls are in flight, a pipeline lets its answers gather
and flushes when

* the answered-but-unflushed SMS reach ``pipeline.flush_gather_sms`` (a page);
* the oldest of them has waited ``pipeline.flush_max_wait_ms`` (how long a user
  waits at most for its transactions while its backfill runs on);
* nothing else is in flight or in hand, or the pipeline drains or stops: the
  pipeline's loop flushes at once then, whatever this policy says.

The bill's copy to MongoDB (``smsd_llm_costs``, ``$max`` of the journal's
ledger rows) is written with a flush when nothing is in flight, and at most
every :data:`COSTS_EVERY_S` seconds while calls are: the journal holds the
bill, MongoDB's copy only lags (and a replay syncs it as before).

Every answer is committed to the journal by the LLM thread that received it
before it reaches the main loop (DESIGN.md invariant 1), so gathering moves
only *when* MongoDB sees an answer, never *whether*: a kill while answers
gather loses nothing journaled, and the restart replays them with the same
:meth:`smsd.pipeline.Pipeline.flush`.  ``flush_gather_sms = 1`` (or
``flush_max_wait_ms = 0``) flushes after every answer, as before gathering.
"""
from __future__ import annotations

import time
from typing import Callable

#: Seconds between copies of the bill to MongoDB while calls are in flight.
COSTS_EVERY_S = 10.0


class FlushPolicy:
    """Decides, at each turn of a pipeline's loop, whether its journaled answers are flushed now."""

    def __init__(self, gather_sms: int, max_wait_ms: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.gather_sms = gather_sms
        self.max_wait_s = max(0, max_wait_ms) / 1000.0
        self.clock = clock
        self._since: float | None = None   # when unflushed answers were first seen since the last flush
        self._costs_at: float | None = None   # when the bill was last copied

    @property
    def every_answer(self) -> bool:
        """True when gathering is off: every loop turn flushes what is answered."""
        return self.gather_sms <= 1 or self.max_wait_s <= 0

    def due(self, unflushed_sms: int) -> bool:
        """Whether ``unflushed_sms`` answered SMS are to be flushed now (calls still in flight)."""
        if self.every_answer:
            return True
        if unflushed_sms <= 0:
            self._since = None
            return False
        now = self.clock()
        if self._since is None:
            self._since = now
        return unflushed_sms >= self.gather_sms or now - self._since >= self.max_wait_s

    def wait_s(self, default: float) -> float:
        """How long the loop may wait for an answer before the oldest gathered one is due."""
        if self._since is None or self.every_answer:
            return default
        return max(0.0, min(default, self._since + self.max_wait_s - self.clock()))

    def flushed(self) -> None:
        """A flush wrote everything answered so far: the next answer starts a new wait."""
        self._since = None

    def costs_due(self, busy: bool) -> bool:
        """Whether this flush copies the bill too (``busy``: calls are in flight); notes it if so."""
        now = self.clock()
        if busy and not self.every_answer and self._costs_at is not None \
                and now - self._costs_at < COSTS_EVERY_S:
            return False
        self._costs_at = now
        return True
