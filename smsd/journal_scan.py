"""Read-only numbers of journals: the counters of one, and :func:`scan` of all.

:func:`scan` opens every journal in a state directory read-only and without
the per-user lock, for the lab and tests; :func:`scan_changed` opens only the
journals changed since the previous call, for the supervisor's discovery
tick.  The counters they report are the same :meth:`smsd.journal.Journal.stats`
gives a writer.  It is apart from the writer because it never writes, never locks,
and must not stop at a file it cannot read.
"""
from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Container, Mapping, Sequence
from pathlib import Path

from smsd.ledger import ledger_stats
from smsd.journal_schema import SCHEMA_VERSION, UNFLUSHED_COUNT, JournalDb, _meta, _rows, _tables

# The logger keeps the name it had when scan() lived in smsd.journal.
log = logging.getLogger("smsd.journal")

#: SMS whose answer was rejected by the grounding check (smsd.grounding.PREFIX), still
#: being asked again or quarantined but not yet flushed (a flushed quarantine leaves the
#: journal: MongoDB counts it).  A key in both tables counts once.
UNGROUNDED_COUNT = ("SELECT COUNT(*) FROM (SELECT sms_key FROM failures WHERE last_error LIKE 'ungrounded:%'"
                    " AND sms_key NOT IN (SELECT sms_key FROM results)"
                    " UNION SELECT sms_key FROM quarantine WHERE reason LIKE 'ungrounded:%')")

#: How long :func:`scan` waits for a SQLite lock before skipping a file.
SCAN_BUSY_TIMEOUT_MS = 200


def _stats(db: JournalDb) -> dict:
    tables = _tables(db)
    out = _call_stats(db)
    out["batches"] = _open_batches(db) if "batch_jobs" in tables else []
    # A journal of schema 1 (not yet opened by this smsd's writer) has no ledger.
    if "ledger" in tables:
        out.update(ledger_stats(_rows(db, "SELECT * FROM ledger")))
    return out


def _call_stats(db: JournalDb) -> dict:
    # One statement: status ticks and turn ends read every open journal's counters.
    calls = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(repeated_sms > 0), 0), COALESCE(SUM(repeated_sms), 0),"
        " COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0),"
        " COALESCE(SUM(state = 'sent'), 0), COALESCE(SUM(state = 'failed'), 0),"
        " COALESCE(SUM(state = 'answered' AND model NOT IN ('rules', 'cache')), 0),"
        " COALESCE(SUM(model = 'rules'), 0),"
        f" ({UNFLUSHED_COUNT}), (SELECT COUNT(*) FROM results), (SELECT COUNT(*) FROM quarantine),"
        f" (SELECT COUNT(*) FROM quarantine WHERE flushed = 0), ({UNGROUNDED_COUNT}) FROM calls"
    ).fetchone()
    return {
        "unflushed": calls[9],
        "calls": calls[0],
        "repeated_calls": calls[1],
        "repeated_sms": calls[2],
        "prompt_tokens": calls[3],
        "completion_tokens": calls[4],
        "sent_calls": calls[5],  # never answered nor failed: in flight or cut by a crash
        "failed_calls": calls[6],
        "answered_calls": calls[7],  # paid calls answered (the rules' and the answer cache's rows are not)
        "rules_calls": calls[8],     # rows of answers the offline rules were certain of
        "answered_sms": calls[10],
        "quarantined": calls[11],
        "unflushed_quarantine": calls[12],
        "ungrounded": calls[13],
    }


def _open_batches(db: JournalDb) -> list[dict]:
    """The journal's open Batch API jobs (smsd.batch's tables: the caller checked they exist)."""
    cols = ("job_id", "batch_id", "state", "server_state", "n_sms", "n_calls", "request_counts",
            "created_at")
    rows = db.execute(f"SELECT {', '.join(cols)} FROM batch_jobs"
                      " WHERE state IN ('prepared', 'uploaded', 'created') ORDER BY created_at").fetchall()
    return [dict(zip(cols, r)) for r in rows]


def _read(path: Path) -> tuple[str, dict] | None:
    """``(user_id, stats)`` of one journal file, or ``None`` (skipped with a warning)."""
    conn = None
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True,
                               isolation_level=None, check_same_thread=False,
                               timeout=SCAN_BUSY_TIMEOUT_MS / 1000)
        db = JournalDb(conn)
        db.execute(f"PRAGMA busy_timeout = {SCAN_BUSY_TIMEOUT_MS}")
        if "meta" not in _tables(db):
            log.warning("journal scan: skipping %s: no journal schema (yet)", path)
            return None
        meta = _meta(db)
        version = int(meta.get("schema_version", "0"))
        # Older versions read the same (a writer upgrades them on open).
        if not 1 <= version <= SCHEMA_VERSION or not meta.get("user_id"):
            log.warning("journal scan: skipping %s: schema version %s, this smsd reads %s",
                        path, version, SCHEMA_VERSION)
            return None
        return meta["user_id"], _stats(db)
    except (sqlite3.Error, OSError, ValueError) as e:
        log.warning("journal scan: skipping %s: %s", path, e)
        return None
    finally:
        if conn is not None:
            conn.close()


def scan(state_dir: str | os.PathLike) -> dict[str, dict]:
    """``{user_id: stats}`` of every journal in ``state_dir/journal``, for the
    lab and tests (the supervisor uses :func:`scan_changed`).  Files are opened
    read-only, without the per-user lock, so a worker writing meanwhile is
    neither blocked nor blocks this (WAL).  Unreadable, corrupt or foreign
    files are skipped with a warning."""
    out: dict[str, dict] = {}
    directory = Path(state_dir) / "journal"
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.sqlite")):
        found = _read(path)
        if found is not None:
            out[found[0]] = found[1]
    return out


def _signature(directory: Path, name: str, has_wal: bool) -> list | None:
    """``[mtime_ns, size, wal mtime_ns, wal size]`` of one journal, ``None`` if it is gone.

    A commit lands in the ``-wal`` file and a checkpoint in the main file, so
    the pair of both changes whenever the journal's content does; a read-only
    reader (this module) changes neither (it may create an empty WAL, which
    counts as none).
    """
    try:
        st = os.stat(directory / name)
    except OSError:
        return None
    sig = [st.st_mtime_ns, st.st_size, 0, 0]
    if has_wal:
        try:
            wal = os.stat(directory / f"{name}-wal")
        except OSError:
            return sig
        if wal.st_size:
            sig[2], sig[3] = wal.st_mtime_ns, wal.st_size
    return sig


def scan_changed(state_dir: str | os.PathLike, seen: Mapping[str, Sequence],
                 check: Container[str] | None = None) -> dict:
    """What changed in ``state_dir/journal`` since the scan that returned ``seen``.

    ``seen`` maps a file name to ``[mtime_ns, size, wal mtime_ns, wal size, user_id]``
    as an earlier call returned it (JSON-safe: the supervisor keeps it and the
    discovery child gets it).  Only files whose signature differs are opened,
    so a tick with 10,000 idle journals opens none.  ``check``, when given,
    names the files that may have changed (the journals of users that had a
    worker since the last scan): the others are listed but not even
    ``stat``-ed, unless new.  Returns ``{"journals": {user_id: stats}, "seen":
    {name: [..., user_id]} (new or changed files; user_id ``None`` for a file
    skipped, retried once it changes), "gone": {name: user_id} (files no
    longer there)}``.
    """
    directory = Path(state_dir) / "journal"
    out: dict = {"journals": {}, "seen": {}, "gone": {}}
    names: set[str] = set()
    wals: set[str] = set()
    if directory.is_dir():
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.endswith(".sqlite"):
                    names.add(entry.name)
                elif entry.name.endswith(".sqlite-wal"):
                    wals.add(entry.name[:-len("-wal")])
    for name, old in seen.items():
        if name not in names:
            out["gone"][name] = old[4] if len(old) > 4 else None
    for name in sorted(names):
        old = seen.get(name)
        if old is not None and check is not None and name not in check:
            continue
        sig = _signature(directory, name, name in wals)
        if sig is None or (old is not None and list(old[:4]) == sig):
            continue
        found = _read(directory / name)
        if found is not None:
            out["journals"][found[0]] = found[1]
        out["seen"][name] = sig + [found[0] if found else None]
    return out
