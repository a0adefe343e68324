"""Latency histograms a worker keeps and the supervisor adds up.

A worker lives for one turn of one user, so its figures cannot be scraped
from it: it counts observations into fixed buckets and sends the cumulative
counts in its status line (:meth:`Histogram.to_wire`).  The supervisor adds
each worker's increase since its previous line (:meth:`Histogram.add_delta`),
so a dropped heartbeat loses nothing and a worker's exit keeps what it
counted.  The buckets are fixed here, shared by both sides; a line whose
buckets do not match (another smsd version) is ignored.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Sequence

#: Upper bounds (seconds) of the LLM call latency buckets (one HTTP request).
LLM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Upper bounds (seconds) of the flush latency buckets (one flush to MongoDB).
FLUSH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Counts per bucket (the last one is +Inf), their sum and number."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)

    def observe(self, seconds: float) -> None:
        """Count one observation."""
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def to_wire(self) -> dict:
        """The JSON-safe form sent in a worker's status line."""
        return {"counts": list(self.counts), "sum": round(self.sum, 6)}

    def add_delta(self, new: dict, old: dict | None) -> None:
        """Add what a worker counted between two of its status lines (``old`` None: since it began)."""
        counts = new.get("counts") if isinstance(new, dict) else None
        if not isinstance(counts, list) or len(counts) != len(self.counts):
            return
        before = (old or {}).get("counts") or [0] * len(counts)
        if len(before) != len(counts):
            before = [0] * len(counts)
        for i, (a, b) in enumerate(zip(counts, before)):
            if isinstance(a, int) and isinstance(b, int) and a > b:
                self.counts[i] += a - b
        grown = float(new.get("sum") or 0.0) - float((old or {}).get("sum") or 0.0)
        if grown > 0:
            self.sum += grown

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, count of observations <= le), ...]`` ending with ``+Inf``, as Prometheus wants."""
        out, running = [], 0
        for bound, n in zip(list(self.bounds) + [float("inf")], self.counts):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out
