"""Counters the supervisor keeps for ``/metrics`` and ``smsctl status``, fed from its loop.

The supervisor learns figures from two sources of different ages: discovery's
per-user counts from MongoDB and journal scan, and the workers' status lines
(cumulative since the worker began).  :class:`Figures` keeps every per-user
counter as the largest value seen, so the two can never make a counter go
down, and each value is a lower bound of the truth: a worker's figure is its
user's count when it started plus what it marked since, and it is the only
writer of that user (the journal lock).  After a supervisor restart the first
discovery rebuilds them; the latency histograms and restart counts start
again from zero.
"""
from __future__ import annotations

from collections import Counter

from .children import WorkerProc
from .histogram import FLUSH_BUCKETS, LLM_BUCKETS, Histogram

#: Journal counters that only grow (``unflushed`` is a gauge, not here).
JOURNAL_COUNTERS = ("calls", "answered_calls", "failed_calls", "rules_calls", "repeated_calls",
                    "prompt_tokens", "cached_tokens", "completion_tokens")
#: The per-user counts kept from MongoDB (discovery) and the workers' lines.
USER_COUNTERS = ("processed", "quarantined")


class Figures:
    """What the supervisor adds up between scrapes (fed from its loop, never blocking)."""

    def __init__(self) -> None:
        self.user_floor: dict[str, dict[str, int]] = {k: {} for k in USER_COUNTERS}
        self.journal_floor: dict[str, dict[str, int]] = {}
        self.spawn_base: dict[int, dict[str, int]] = {}
        self.last_latency: dict[int, dict] = {}
        self.latency = {"llm": Histogram(LLM_BUCKETS), "flush": Histogram(FLUSH_BUCKETS)}
        self.restarts: Counter[str] = Counter()
        # Sums kept as the floors rise, so a scrape costs nothing per user.
        self.totals: Counter[str] = Counter()

    def _raise(self, table: dict[str, int], key: str, value: object, total: str) -> None:
        if isinstance(value, int) and value > table.get(key, 0):
            self.totals[total] += value - table.get(key, 0)
            table[key] = value

    def _journal(self, user_id: str, journal: dict | None) -> None:
        if not journal:
            return
        floor = self.journal_floor.setdefault(user_id, {})
        for key in JOURNAL_COUNTERS:
            self._raise(floor, key, journal.get(key), "journal." + key)

    def worker_started(self, pid: int, user_id: str) -> None:
        """Remember the user's counts as known now: the worker's figures add to them."""
        self.spawn_base[pid] = {k: self.user_floor[k].get(user_id, 0) for k in USER_COUNTERS}
        # A turn's pipeline counts its latencies from zero: its first line is all news.
        self.last_latency.pop(pid, None)

    def worker_status(self, w: WorkerProc) -> None:
        """Take in a worker's newest status line (called after every read of its pipe)."""
        st = w.status
        if not st:
            return
        latency = st.get("latency")
        if isinstance(latency, dict):
            before = self.last_latency.get(w.pid) or {}
            for name, hist in self.latency.items():
                if isinstance(latency.get(name), dict):
                    hist.add_delta(latency[name], before.get(name))
            self.last_latency[w.pid] = latency
        base = self.spawn_base.get(w.pid)
        if base is not None:
            for key, field in (("processed", "newly_processed"), ("quarantined", "quarantined")):
                if isinstance(st.get(field), int):
                    self._raise(self.user_floor[key], w.user_id, base[key] + st[field], key)
        self._journal(w.user_id, st.get("journal"))

    def worker_exited(self, w: WorkerProc, restart_reason: str | None) -> None:
        """A worker was reaped: keep its last figures; count a restart it causes."""
        self.worker_status(w)
        self.spawn_base.pop(w.pid, None)
        self.last_latency.pop(w.pid, None)
        if restart_reason:
            self.restarts[restart_reason] += 1

    def discovered(self, users: dict) -> None:
        """Take in discovery's per-user counts (MongoDB) and journal scan."""
        for user_id, info in users.items():
            if not isinstance(info, dict):
                continue
            self._raise(self.user_floor["processed"], user_id, info.get("processed_sms"), "processed")
            self._raise(self.user_floor["quarantined"], user_id, info.get("quarantined_sms"), "quarantined")
            self._journal(user_id, info.get("journal"))

    def user_total(self, key: str) -> int:
        """A per-user counter summed over users."""
        return self.totals[key]

    def journal_total(self, key: str) -> int:
        """A journal counter summed over users."""
        return self.totals["journal." + key]

    def has_journal_key(self, key: str) -> bool:
        """Whether any journal reported ``key`` above zero (older journals lack newer counters)."""
        return self.totals["journal." + key] > 0
