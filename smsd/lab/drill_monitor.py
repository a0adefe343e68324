"""The drill's progress monitor: a thread that polls MongoDB while the daemon works.

It counts SMS processed per user and SMS still pending, and from those samples
measures how long the daemon took to flush again after each kill (the
recovery time of the report).  Apart from :mod:`smsd.lab.drill` because it
watches the daemon from the outside and shares nothing with the kills but the
clock origin.
"""
from __future__ import annotations

import threading
import time

from .drill_common import DB_NAME, KillEvent

class Monitor(threading.Thread):
    """Polls MongoDB: SMS processed per user and SMS still pending.

    Samples are ``(t, {user: processed} | None)`` with ``t`` in seconds since
    the drill's clock origin; ``None`` while the database does not answer.
    The poll interval adapts to the cost of a poll (at most ~1/3 of the time).
    """

    def __init__(self, uri: str, users: list[str], origin: float, total: int) -> None:
        super().__init__(name="drill-monitor", daemon=True)
        self.uri = uri
        self.users = users
        self.origin = origin
        self.total = total
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.samples: list[tuple[float, dict[str, int] | None]] = []
        self.pending: int | None = None
        self.processed = 0

    def run(self) -> None:
        """Poll until stopped (a daemon thread)."""
        import pymongo
        from pymongo.errors import PyMongoError

        from ..store import RAW_COLLECTION, Store

        client = pymongo.MongoClient(self.uri, directConnection=True, serverSelectionTimeoutMS=400,
                                     connectTimeoutMS=400, socketTimeoutMS=10000)
        coll = client[DB_NAME][RAW_COLLECTION]
        interval = 0.25
        try:
            while not self.stop_event.wait(interval):
                t = time.monotonic()
                try:
                    counts = {u: int(coll.count_documents({"user_id": u, "isprocessed": True}))
                              for u in self.users}
                    pending = int(coll.count_documents(Store.pending_filter()))
                except PyMongoError:
                    counts, pending = None, None
                took = time.monotonic() - t
                with self.lock:
                    self.samples.append((t - self.origin, counts))
                    if counts is not None:
                        self.processed = sum(counts.values())
                        self.pending = pending
                interval = min(2.0, max(0.25, 2.0 * took))
        finally:
            client.close()

    def snapshot(self) -> tuple[int, int | None]:
        """(processed, pending) as last seen; pending is None before the first answer."""
        with self.lock:
            return self.processed, self.pending

    def recovery(self, killed: float, resumed: float, user: str | None,
                 until: float | None = None, db_was_down: bool = False) -> tuple[float | None, str]:
        """Seconds from ``resumed`` until the processed count (of ``user``, or all) rises.

        The baseline is the count just after the kill (nothing killed can
        flush any more), or, when the database was down, the last count before
        the kill.  ``None`` with a note when the count did not rise, or only
        after ``until`` (the next kill, which then owns the delay).
        """
        with self.lock:
            samples = [(t, c) for t, c in self.samples if c is not None]

        def value(counts: dict[str, int]) -> int:
            return counts.get(user, 0) if user else sum(counts.values())

        if db_was_down:
            before = [(t, c) for t, c in samples if t <= killed]
            base = before[-1] if before else None
        else:
            after = [(t, c) for t, c in samples if t >= killed]
            base = after[0] if after else None
        if base is None:
            return None, "no count around the kill"
        for t, counts in samples:
            if t <= max(resumed, base[0]):
                continue
            if value(counts) > value(base[1]):
                if until is not None and t > until:
                    return None, "the next kill came first"
                return round(t - resumed, 2), ""
        return None, "no further flush seen (nothing left to do)"

    def recovered(self, ev: "KillEvent") -> bool:
        """Whether the processed count rose again after ``ev``."""
        if ev.resumed_at_s is None:
            return True
        return self.recovery(ev.at_s, ev.resumed_at_s, ev.user_id if ev.kind == "worker" else None,
                             db_was_down=ev.db_down_s is not None)[0] is not None
