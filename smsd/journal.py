"""The local write-ahead journal: one SQLite file per user.

A paid LLM answer is committed here before any MongoDB write that depends on
it (invariant 1), and an SMS that has a result here is never asked again
(invariant 5).  The life of one LLM call in the journal::

    begin_call()     'sent'      committed BEFORE the request goes out, so a
                                 crash while waiting shows which SMS were in
                                 flight (and a re-ask is counted as repeated)
    record_answer()  'answered'  results + usage + failure counts, ONE commit
    mark_flushed()   flushed=1   after the results are safely in MongoDB
    record_failure() 'failed'    the whole call failed; attempts += 1

The pipeline calls :meth:`Journal.record_answer` and :meth:`Journal.record_failure`
in the LLM thread that received the response, right after it is parsed, while the
pipeline's main thread may be waiting on MongoDB or reading the journal: each thread
has its own connection (:mod:`smsd.journal_conn`), reads take no lock, write
transactions take one; WAL, ``synchronous=FULL`` (the fsync in each commit, or with
``background_sync`` in a syncer thread that the flush's reads wait for: :mod:`smsd.journal_sync`).

Answer -> commit latency: ``calls.committed_at`` (REAL, epoch seconds as
``time.time()``, UTC) is the time the answer's ``COMMIT`` returned, i.e. when the
answer was durable (after the WAL fsync).  A transaction cannot record its own
end, so the committing transaction stamps the moment right before ``COMMIT`` and
the journal's next write transaction of another kind (a flush's
:meth:`Journal.mark_flushed`, a ``begin_call``...) or :meth:`Journal.close`
replaces it with the time ``COMMIT`` returned; a kill in between leaves the
pre-``COMMIT`` stamp, an fsync short (``Journal.commit_timings()`` holds the
BEGIN..COMMIT durations).  ``calls.answered_at`` (same units) is taken when the
transaction begins.  A bench compares ``committed_at`` with the LLM server's
last-byte time of the same call (match them by ``calls.request_id``, the
response's ``x-request-id``), e.g.::

    SELECT request_id, answered_at, committed_at FROM calls WHERE state = 'answered'

``committed_at`` is NULL for calls answered by an smsd older than schema 2.

Only one process may write a user's journal: :meth:`Journal.open` takes an
exclusive ``flock`` on ``{path}.lock`` and keeps it until :meth:`Journal.close`
(or until the process dies: the kernel drops the lock, even after
``kill -9``).  :func:`scan` reads every journal read-only without the lock,
for the supervisor's status.

Files are 0600 in a 0700 directory: results contain account masks and
counterparties.  SMS text is never stored here and never logged.
"""
from __future__ import annotations
import json
import logging
import os
import sqlite3
import time
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable, Iterator

# JournalLocked and the file helpers live in journal_conn; re-exported for callers.
from smsd.journal_conn import (Connections, JournalLocked, _chmod_600, _take_lock,  # noqa: F401
                               connect, write_new_file)
# scan() lives in journal_scan; it is re-exported here for callers of journal.scan.
from smsd.journal_scan import _stats, scan  # noqa: F401
from smsd.journal_sync import WalSyncer
# JournalError is defined with the format it guards; re-exported for callers.
from smsd.journal_schema import (UNFLUSHED_COUNT, JournalDb, JournalError, _scalar, init_schema,  # noqa: F401
                                 journal_path, new_journal_image)
from smsd.journal_ledger import LedgerRows
from smsd.ledger import add_to_ledger, usd_text
from smsd.model import (Provenance, Quarantine, SmsResult, Usage, raw_id_from_bytes,
                        raw_id_to_bytes, sms_key)

log = logging.getLogger("smsd.journal")

#: Keys per ``IN (...)`` list (SQLite limits bound parameters per statement).
CHUNK = 500
#: How many record_answer commit durations :meth:`Journal.commit_timings` keeps.
TIMINGS_KEPT = 10_000


class AlreadyAnswered(JournalError):
    """begin_call() was given SMS that already have a result (invariant 5)."""

    def __init__(self, keys: list[str]):
        self.keys = keys
        super().__init__(f"{len(keys)} SMS already have a result in the journal; "
                         "they must not be asked again")


@dataclass
class Answer:
    """One answered LLM call whose results are not flushed to MongoDB yet."""

    call_id: str
    owner: str
    epoch: int
    model: str
    request_id: str | None
    answered_at: datetime
    items: list[tuple[Any, SmsResult]]  # (raw_id, result), in answer order
    repeated_sms: int = 0               # SMS of the call already asked in an earlier call

    def provenance(self) -> Provenance:
        return Provenance(call_id=self.call_id, model=self.model, request_id=self.request_id,
                          answered_at=self.answered_at, owner=self.owner, epoch=self.epoch)



def _now() -> float:
    return time.time()


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def _chunks(keys: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(keys), CHUNK):
        yield keys[i:i + CHUNK]


def _marks(n: int) -> str:
    return ",".join("?" * n)


class Journal(LedgerRows):
    """One user's journal, opened for writing under the exclusive lock.

    Thread-safe: each thread reads on its own connection without a lock; write
    transactions are serialised by one lock (:mod:`smsd.journal_conn`).  Do not
    use a Journal in a forked child (the lock fd would be shared); open it after
    forking.
    """

    path: Path
    user_id: str

    def __init__(self, path: Path, user_id: str, conns: Connections, lock_fd: int,
                 syncer: WalSyncer | None = None, meta: dict[str, str] | None = None):
        self.path = path
        # The meta table as read at open; only this holder of the lock writes it (set_meta).
        self._meta = dict(meta or {})
        self._syncer = syncer
        self.user_id = user_id
        self._conns = conns
        self._lock_fd: int | None = lock_fd
        self._pid = os.getpid()
        self._mutex = conns.write_lock
        self._timings: deque[float] = deque(maxlen=TIMINGS_KEPT)
        # (time COMMIT returned, call_id) of answers whose committed_at still holds
        # the pre-COMMIT stamp; written by the next write of another kind.
        self._durable: deque[tuple[float, str]] = deque(maxlen=TIMINGS_KEPT)

    def prepare_committer(self) -> None:
        """In a thread that will commit answers (an LLM thread): open its connection now,
        without automatic checkpoints (:meth:`smsd.journal_conn.Connections.prepare_committer`)."""
        self._check_usable()
        self._conns.prepare_committer()

    def release_connection(self) -> None:
        """The calling thread is done with this journal: another thread may take its
        connection (:meth:`smsd.journal_conn.Connections.release`)."""
        self._conns.release()

    @property
    def db(self) -> JournalDb:
        """The calling thread's connection, for inspection and tests; write through the methods."""
        return self._conns.get()

    # -- opening and closing -------------------------------------------------

    @classmethod
    def open(cls, state_dir: str | os.PathLike, user_id: str, *, wait: float = 0.0,
             synchronous: str = "FULL", background_sync: bool = False) -> "Journal":
        """Lock and open (creating if needed) the journal of ``user_id``.

        ``background_sync`` (with ``FULL``): commits return before the WAL fsync, which
        a :class:`smsd.journal_sync.WalSyncer` thread does at once; the readers whose
        rows go to MongoDB wait for it (see :mod:`smsd.journal_sync`).

        Raises :class:`JournalLocked` if another holder keeps the lock for
        more than ``wait`` seconds, :class:`JournalError` if the file is not a
        usable journal (corrupt, newer schema, another user's).
        """
        synchronous = synchronous.upper()
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        path = journal_path(state_dir, user_id)
        os.makedirs(path.parent, mode=0o700, exist_ok=True)
        os.chmod(path.parent, 0o700)
        lock_fd = _take_lock(Path(f"{path}.lock"), user_id, wait)
        conn = None
        syncer = None
        # The commit itself at NORMAL (kill-safe), the fsync by the syncer: see journal_sync.
        background = background_sync and synchronous == "FULL"
        level = "NORMAL" if background else synchronous
        try:
            # The file is 0600 before SQLite opens it: SQLite gives the -wal and
            # -shm files the mode of the database file.
            if path.exists():
                os.chmod(path, 0o600)
            else:   # the schema and its owner in place, durably, before first use
                write_new_file(path, new_journal_image(user_id))
            try:
                conn = connect(path, level)
            except RuntimeError as e:
                raise JournalError(str(e)) from None
            meta = init_schema(conn, path, user_id)
            _chmod_600(path)
            if background:
                syncer = WalSyncer(path)
                syncer.committed()          # the schema's commit, on disk before any use
                syncer.wait()
        except BaseException as e:
            if syncer is not None:
                syncer.close()
            if conn is not None:
                conn.close()
            os.close(lock_fd)
            if isinstance(e, sqlite3.DatabaseError):  # "file is not a database", ...
                raise JournalError(f"{path}: cannot open journal: {e}") from e
            raise
        log.debug("journal opened user=%s path=%s synchronous=%s", user_id, path, synchronous)
        return cls(path, user_id, Connections(path, level, conn), lock_fd, syncer, meta)

    def close(self) -> None:
        """Close the database and release the lock.  Idempotent."""
        with self._mutex:
            if self._lock_fd is None:
                return
            try:
                self._stamp_durable()
            except sqlite3.Error as e:   # only the latency figure loses precision
                log.warning("journal of user %s: commit times not written: %s", self.user_id, e)
            try:
                if self._syncer is not None:
                    self._syncer.close()    # fsyncs what is left
                self._conns.close()
            finally:
                fd, self._lock_fd = self._lock_fd, None
                os.close(fd)  # closing the only fd releases the flock
            log.debug("journal closed user=%s", self.user_id)

    @property
    def closed(self) -> bool:
        return self._lock_fd is None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Journal user={self.user_id!r} path={str(self.path)!r}{' closed' if self.closed else ''}>"

    # -- transactions ------------------------------------------------------------

    @contextmanager
    def _use(self) -> Iterator[JournalDb]:
        """The calling thread's connection, for reads: no lock (WAL readers never wait)."""
        self._check_usable()
        yield self._conns.get()

    def _check_usable(self) -> None:
        if self._lock_fd is None:
            raise JournalError(f"{self.path}: journal is closed")
        if os.getpid() != self._pid:
            raise JournalError(f"{self.path}: journal used in a forked child; open it there")

    @contextmanager
    def _write(self, *, stamp: bool = True) -> Iterator[JournalDb]:
        """One transaction, one commit; rolled back on any error.

        ``stamp``: also write the commit times of earlier answers (see the module
        docstring); record_answer does not, so an answer's transaction holds its own
        statements only."""
        with self._mutex, self._use() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                if stamp:
                    self._stamp_durable(db)
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.rollback()
                raise
            if self._syncer is not None:
                self._syncer.committed()   # under the write lock: see _wait_durable

    def _wait_durable(self) -> None:
        """Return once every commit so far is fsynced (background sync): call it after a
        read whose rows go to MongoDB, so nothing reaches MongoDB before it is on disk."""
        if self._syncer is None:
            return
        with self._mutex:   # no commit half counted: each is counted before the lock is let go
            mark = self._syncer.mark()
        self._syncer.wait(mark)

    def _stamp_durable(self, db: JournalDb | None = None) -> None:
        """Replace the pre-COMMIT stamps of answers by the time their COMMIT returned."""
        if not self._durable:
            return
        done = list(self._durable)
        sql = "UPDATE calls SET committed_at = ? WHERE call_id = ?"
        if db is not None:
            db.conn.executemany(sql, done)
        else:
            with self._write(stamp=False) as own:
                own.conn.executemany(sql, done)
        for _ in done:
            self._durable.popleft()

    @contextmanager
    def transaction(self) -> Iterator[JournalDb]:
        """One write transaction (one commit) for a companion module's own tables
        (:mod:`smsd.batch`); the call life cycle below uses its own methods."""
        with self._write() as db:
            yield db

    def meta(self, key: str) -> str | None:
        """A value of the journal's ``meta`` table (kept since open: no query)."""
        self._check_usable()
        return self._meta.get(key)

    def set_meta(self, key: str, value: str) -> None:
        """Write a value of the ``meta`` table; one commit, none when it is unchanged."""
        if self.meta(key) == value:
            return
        with self._write() as db:
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?)"
                       " ON CONFLICT (key) DO UPDATE SET value = excluded.value", [key, value])
        self._meta[key] = value

    def query(self, sql: str, params: Iterable = ()) -> list[tuple]:
        """Rows of a read-only query on this journal."""
        with self._use() as db:
            return db.execute(sql, list(params)).fetchall()

    # -- the call life cycle ---------------------------------------------------------

    def begin_call(self, items: list[tuple[str, Any]], *, owner: str, epoch: int,
                   model: str, wire_ids: list[str] | None = None,
                   text_hashes: list[str] | None = None) -> str:
        """Commit a 'sent' call for ``items`` = [(sms_key, raw_id)] and return its id.

        Call this BEFORE the request is sent: after a crash the call shows
        which SMS were in flight.  ``wire_ids`` are the ids the SMS get in the
        request (local to this call), kept with the call so that its answer
        maps back exactly; ``text_hashes`` their answer-cache keys, for the
        flush to fill the cache.  Raises :class:`AlreadyAnswered` if any of the SMS
        already has a result, so it is never paid for twice.
        """
        keys = [k for k, _ in items]
        if not keys:
            raise ValueError("begin_call needs at least one SMS")
        if len(set(keys)) != len(keys):
            raise ValueError("begin_call got the same SMS twice")
        wire: list[str | None] = list(wire_ids) if wire_ids is not None else [None] * len(keys)
        if len(wire) != len(keys) or (wire_ids is not None and len(set(wire)) != len(wire)):
            raise ValueError("begin_call needs one unique wire id per SMS")
        hashes: list[str | None] = list(text_hashes) if text_hashes is not None else [None] * len(keys)
        if len(hashes) != len(keys):
            raise ValueError("begin_call needs one text hash per SMS")
        for key, raw_id in items:
            if sms_key(raw_id) != key:
                raise ValueError(f"sms_key {key!r} does not match its raw_id")
        call_id = uuid.uuid4().hex
        with self._write() as db:
            answered = self._answered(db, keys)
            if answered:
                raise AlreadyAnswered(sorted(answered))
            repeated = sum(_scalar(db, "SELECT COUNT(DISTINCT sms_key) FROM call_sms"
                                       f" WHERE sms_key IN ({_marks(len(c))})", c)
                           for c in _chunks(keys))
            db.execute(
                "INSERT INTO calls (call_id, owner, epoch, model, n_sms, repeated_sms, sent_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [call_id, owner, epoch, model, len(keys), repeated, _now()])
            db.conn.executemany(
                "INSERT INTO call_sms (call_id, sms_key, raw_id, wire_id, text_hash) VALUES (?, ?, ?, ?, ?)",
                [(call_id, k, raw_id_to_bytes(r), w, h) for (k, r), w, h in zip(items, wire, hashes)])
        if repeated:
            log.info("call %s re-asks %d SMS already sent in an earlier call", call_id, repeated)
        return call_id

    def record_answer(self, call_id: str, items: list[tuple[Any, SmsResult]], *,
                      failed: dict[str, str], request_id: str | None, usage: Usage,
                      model: str | None = None, cost_usd: Decimal | None = None) -> Decimal:
        """Commit an LLM answer in ONE transaction.

        ``items`` = [(raw_id, result)] become result rows (a key that already
        has a result keeps it: the first answer wins); the call becomes
        'answered' with its usage, request id and (if given) the model that
        actually answered; each key of ``failed`` (key -> error) gets one more
        attempt.  A call left with no result row of its own is marked flushed
        at once, so replay skips it.  ``cost_usd`` is the call's price (None:
        the model has no price); the day's ledger row moves in the same commit.
        Returns the USD of this call that re-bought SMS of earlier calls.
        """
        for raw_id, result in items:
            if sms_key(raw_id) != result.key:
                raise ValueError(f"result key {result.key!r} does not match its raw_id")
        start = time.perf_counter()
        now = _now()
        with self._write(stamp=False) as db:
            self._check_state(db, call_id, "sent")
            db.conn.executemany(
                "INSERT OR IGNORE INTO results (sms_key, call_id, raw_id, kind, transactions)"
                " VALUES (?, ?, ?, ?, ?)",
                [(r.key, call_id, raw_id_to_bytes(raw_id), r.kind,
                  json.dumps([t.to_json() for t in r.transactions], separators=(",", ":")))
                 for raw_id, r in items])
            own = _scalar(db, "SELECT COUNT(*) FROM results WHERE call_id = ?", [call_id])
            n_sms, repeated = db.execute("SELECT n_sms, repeated_sms FROM calls WHERE call_id = ?",
                                         [call_id]).fetchone()
            cost = cost_usd if cost_usd is not None else Decimal(0)
            repeated_usd = cost * repeated / n_sms if n_sms else Decimal(0)
            call_model = model or _scalar(db, "SELECT model FROM calls WHERE call_id = ?", [call_id])
            add_to_ledger(db, _utc(now).date().isoformat(), call_model, n_sms=n_sms,
                          repeated_sms=repeated, usage=usage, cost=cost,
                          repeated_usd=repeated_usd, unpriced=cost_usd is None)
            self._count_failures(db, call_id, failed, now)
            # Last statement before COMMIT: a lower bound, replaced by the time COMMIT
            # returned in the journal's next write (see the module docstring).
            db.execute(
                "UPDATE calls SET state = 'answered', answered_at = ?, request_id = ?,"
                " prompt_tokens = ?, completion_tokens = ?, model = COALESCE(?, model),"
                " flushed = ?, flushed_at = ?, cached_tokens = ?, cost_usd = ?, repeated_usd = ?,"
                " committed_at = ? WHERE call_id = ?",
                [now, request_id, usage.prompt_tokens, usage.completion_tokens, model,
                 0 if own else 1, None if own else now, usage.cached_tokens, usd_text(cost),
                 usd_text(repeated_usd), _now(), call_id])
        self._durable.append((_now(), call_id))   # the answer is durable: COMMIT returned
        self._timings.append(time.perf_counter() - start)
        if len(items) != own:
            log.info("call %s: %d of %d results were already journaled (first answer wins)",
                     call_id, len(items) - own, len(items))
        return repeated_usd

    def record_failure(self, call_id: str, error: str, keys: list[str] | None = None, *,
                       request_id: str | None = None, usage: Usage | None = None) -> None:
        """The whole call failed: mark it 'failed' and count one attempt for
        each of ``keys`` (default: every SMS of the call).  One commit.  Pass
        ``usage`` if tokens were billed anyway (e.g. an answer that was not JSON)."""
        now = _now()
        usage = usage or Usage()
        with self._write() as db:
            self._check_state(db, call_id, "sent")
            db.execute(
                "UPDATE calls SET state = 'failed', answered_at = ?, error = ?, request_id = ?,"
                " prompt_tokens = ?, completion_tokens = ? WHERE call_id = ?",
                [now, error, request_id, usage.prompt_tokens, usage.completion_tokens, call_id])
            if keys is None:
                keys = [r[0] for r in db.execute(
                    "SELECT sms_key FROM call_sms WHERE call_id = ?", [call_id])]
            self._count_failures(db, call_id, dict.fromkeys(keys, error), now)

    def _check_state(self, db: JournalDb, call_id: str, expected: str) -> None:
        row = db.execute("SELECT state FROM calls WHERE call_id = ?", [call_id]).fetchone()
        if row is None:
            raise JournalError(f"{self.path}: unknown call {call_id}")
        if row[0] != expected:
            raise JournalError(f"{self.path}: call {call_id} is {row[0]!r}, not {expected!r}")

    @staticmethod
    def _count_failures(db: JournalDb, call_id: str, failed: dict[str, str],
                        now: float) -> None:
        db.conn.executemany(
            "INSERT INTO failures (sms_key, raw_id, attempts, last_error, at)"
            " VALUES (?1, (SELECT raw_id FROM call_sms WHERE call_id = ?2 AND sms_key = ?1),"
            " 1, ?3, ?4)"
            " ON CONFLICT (sms_key) DO UPDATE SET attempts = attempts + 1,"
            " last_error = excluded.last_error, at = excluded.at,"
            " raw_id = COALESCE(excluded.raw_id, raw_id)",
            [(key, call_id, error, now) for key, error in failed.items()])

    # -- queries -------------------------------------------------------------------

    @staticmethod
    def _answered(db: JournalDb, keys: list[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(keys):
            found.update(r[0] for r in db.execute(
                f"SELECT sms_key FROM results WHERE sms_key IN ({_marks(len(chunk))})", chunk))
        return found

    def answered_keys(self, keys: Iterable[str]) -> set[str]:
        """The subset of ``keys`` that already has a result (never ask those again)."""
        with self._use() as db:
            return self._answered(db, list(keys))

    def attempts(self, keys: Iterable[str]) -> dict[str, int]:
        """Failed attempts so far for each of ``keys`` (0 for keys never failed)."""
        keys = list(keys)
        out = dict.fromkeys(keys, 0)
        with self._use() as db:
            for chunk in _chunks(keys):
                out.update(db.execute(
                    f"SELECT sms_key, attempts FROM failures"
                    f" WHERE sms_key IN ({_marks(len(chunk))})", chunk).fetchall())
        return out

    def unflushed(self, limit: int | None = None) -> list[Answer]:
        """Answered calls with results not yet flushed to MongoDB, oldest first."""
        with self._use() as db:
            calls = db.execute(
                "SELECT call_id, owner, epoch, model, request_id, answered_at, repeated_sms"
                " FROM calls WHERE state = 'answered' AND flushed = 0 ORDER BY seq LIMIT ?",
                [-1 if limit is None else limit]).fetchall()
            answers = {c[0]: Answer(call_id=c[0], owner=c[1], epoch=c[2], model=c[3],
                                    request_id=c[4], answered_at=_utc(c[5]), items=[],
                                    repeated_sms=c[6])
                       for c in calls}
            for chunk in _chunks(list(answers)):
                for key, call_id, raw, kind, txs in db.execute(
                        "SELECT sms_key, call_id, raw_id, kind, transactions FROM results"
                        f" WHERE call_id IN ({_marks(len(chunk))}) ORDER BY rowid", chunk):
                    result = SmsResult.from_json(
                        {"id": key, "kind": kind, "transactions": json.loads(txs)})
                    answers[call_id].items.append((raw_id_from_bytes(raw), result))
        self._wait_durable()
        return [a for a in answers.values() if a.items]

    def unflushed_keys(self, limit: int | None = None) -> list[str]:
        """Keys of the SMS results awaiting a flush, oldest answer first (no parsing)."""
        with self._use() as db:
            return [row[0] for row in db.execute(
                "SELECT r.sms_key FROM calls c JOIN results r ON r.call_id = c.call_id"
                " WHERE c.state = 'answered' AND c.flushed = 0 ORDER BY c.seq LIMIT ?",
                [-1 if limit is None else limit])]

    def unflushed_count(self) -> int:
        """Number of SMS results (not calls) awaiting a flush."""
        with self._use() as db:
            return _scalar(db, UNFLUSHED_COUNT)

    def mark_flushed(self, call_ids: list[str]) -> None:
        """Mark answered calls flushed (invariant 4: only after their SMS are
        processed in MongoDB).  One commit."""
        now = _now()
        with self._write() as db:
            for chunk in _chunks(list(call_ids)):
                db.execute(f"UPDATE calls SET flushed = 1, flushed_at = ? WHERE flushed = 0"
                           f" AND state = 'answered' AND call_id IN ({_marks(len(chunk))})",
                           [now, *chunk])

    # -- quarantine and retry ----------------------------------------------------------

    def add_quarantine(self, items: list[Quarantine]) -> None:
        """Record quarantine decisions (replacing older ones for the same SMS),
        to be written to MongoDB by the flush.  One commit."""
        now = _now()
        for q in items:
            if q.user_id != self.user_id:
                raise ValueError(f"quarantine item of user {q.user_id!r} in the journal "
                                 f"of {self.user_id!r}")
        with self._write() as db:
            db.conn.executemany(
                "INSERT OR REPLACE INTO quarantine (sms_key, raw_id, reason, attempts, extra, at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(q.key, raw_id_to_bytes(q.raw_id), q.reason, q.attempts,
                  json.dumps(q.extra, default=str), now) for q in items])

    def unflushed_quarantine(self) -> list[Quarantine]:
        """Quarantine decisions not yet written to MongoDB, oldest first."""
        with self._use() as db:
            rows = db.execute("SELECT raw_id, sms_key, reason, attempts, extra FROM quarantine"
                              " WHERE flushed = 0 ORDER BY at, rowid").fetchall()
        self._wait_durable()
        return [Quarantine(raw_id=raw_id_from_bytes(raw), key=key, user_id=self.user_id,
                           reason=reason, attempts=attempts, extra=json.loads(extra))
                for raw, key, reason, attempts, extra in rows]

    def mark_quarantine_flushed(self, keys: list[str]) -> None:
        """The quarantine of these SMS is stored in MongoDB.  One commit."""
        now = _now()
        with self._write() as db:
            for chunk in _chunks(list(keys)):
                db.execute(f"UPDATE quarantine SET flushed = 1, flushed_at = ?"
                           f" WHERE sms_key IN ({_marks(len(chunk))})", [now, *chunk])

    def clear_failures(self, keys: Iterable[str] | None = None) -> None:
        """For ``smsctl retry``: forget attempt counts and quarantine rows of
        ``keys`` (all if None), so those SMS get a fresh set of attempts.  An
        unflushed quarantine row is dropped too: its SMS was never marked
        quarantined in MongoDB, so it is simply still pending.  One commit."""
        with self._write() as db:
            if keys is None:
                db.execute("DELETE FROM failures")
                db.execute("DELETE FROM quarantine")
                return
            for chunk in _chunks(list(keys)):
                for table in ("failures", "quarantine"):
                    db.execute(f"DELETE FROM {table} WHERE sms_key IN ({_marks(len(chunk))})",
                               chunk)

    # -- numbers -------------------------------------------------------------------------

    def stats(self) -> dict:
        """Counters for ``smsctl status``::

            unflushed         SMS results awaiting a flush
            calls             LLM calls begun (sent, answered or failed)
            repeated_calls    calls that re-asked an SMS of an earlier call
                              (a crash or a failure made us buy it again)
            repeated_sms      SMS re-asked, summed over calls
            prompt_tokens, completion_tokens
            sent_calls        calls never answered nor failed (in flight or cut by a crash)
            failed_calls
            answered_sms      SMS with a result
            quarantined, unflushed_quarantine
            ungrounded        SMS whose answer failed the grounding check and that
                              are being asked again or await their quarantine flush
            cost_usd, repeated_usd   the bill (Decimal strings; smsd.ledger.ledger_stats)
            cached_tokens, paid_sms, free_sms, cache_hits, unpriced_calls
        """
        with self._use() as db:
            return _stats(db)

    def commit_timings(self) -> list[float]:
        """Durations (s) of the last record_answer transactions, BEGIN to COMMIT."""
        with self._mutex:
            return list(self._timings)

