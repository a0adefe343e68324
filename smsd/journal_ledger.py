"""The journal's bill rows and answer-cache keys: the part of :class:`smsd.journal.Journal`
that :mod:`smsd.ledger` and :mod:`smsd.answer_cache` use.

A mixin: the methods run in the journal's own transactions (``_use``/``_write``
of the class that mixes it in), so they keep its lock and its one-commit rules.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Iterator

from smsd.journal_schema import _rows

#: Keys per ``IN (...)`` list (as in smsd.journal).
CHUNK = 500


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _chunks(keys: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(keys), CHUNK):
        yield keys[i:i + CHUNK]


class LedgerRows:
    """Ledger rows to copy to MongoDB, cache keys of a call's SMS, races counted."""

    _use: Any
    _write: Any
    _wait_durable: Any

    def unsynced_ledger(self) -> list[dict]:
        """Ledger rows (day, model, totals, rev) changed since they were last written to MongoDB."""
        with self._use() as db:
            rows = _rows(db, "SELECT * FROM ledger WHERE synced_rev < rev")
        self._wait_durable()   # what goes to MongoDB is on disk first
        return rows

    def text_hashes(self, call_ids: list[str]) -> dict[str, str]:
        """``{sms_key: answer-cache key}`` of the SMS of these calls that have one."""
        out: dict[str, str] = {}
        with self._use() as db:
            for chunk in _chunks(list(call_ids)):
                out.update(db.execute(f"SELECT sms_key, text_hash FROM call_sms WHERE text_hash IS NOT NULL"
                                      f" AND call_id IN ({_marks(len(chunk))})", chunk).fetchall())
        return out

    def note_cache_races(self, model: str, n: int) -> None:
        """``n`` flushed SMS of ``model`` had been paid by another call too.  One commit."""
        day = datetime.fromtimestamp(time.time(), tz=timezone.utc).date().isoformat()
        with self._write() as db:
            db.execute("INSERT INTO ledger (day, model) VALUES (?, ?) ON CONFLICT (day, model) DO NOTHING",
                       [day, model])
            db.execute("UPDATE ledger SET cache_races = cache_races + ?, rev = rev + 1"
                       " WHERE day = ? AND model = ?", [n, day, model])

    def mark_ledger_synced(self, rows: list[dict]) -> None:
        """These rows, at the rev they were read, are in MongoDB.  One commit."""
        with self._write() as db:
            db.conn.executemany(
                "UPDATE ledger SET synced_rev = MAX(synced_rev, ?) WHERE day = ? AND model = ?",
                [(r["rev"], r["day"], r["model"]) for r in rows])

