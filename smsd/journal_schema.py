"""The journal's on-disk format: the SQLite schema, its version, file names.

One user's journal is one SQLite file; this module says what is in it (the
tables of :data:`SCHEMA`, stamped with :data:`SCHEMA_VERSION` in ``meta``) and
where it lives (:func:`journal_path`), plus the small query helpers both the
writer (:class:`smsd.journal.Journal`) and the read-only scan
(:mod:`smsd.journal_scan`) use.  It is apart from the writer so that readers
of the format need neither the lock nor the call life cycle.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import quote

#: Version of the schema below.  A journal written by a newer smsd is refused;
#: an older one is upgraded in place by :data:`MIGRATIONS` when a writer opens it.
SCHEMA_VERSION = 3
#: Longest quoted user id used as a file name; longer ones are hashed.
MAX_NAME = 150



class JournalError(Exception):
    """The journal cannot be used: corrupt, newer schema, wrong user, closed..."""


SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

-- One row per paid LLM call.  seq is the send order (clock-independent).
CREATE TABLE calls (
    seq               INTEGER PRIMARY KEY,
    call_id           TEXT NOT NULL UNIQUE,
    owner             TEXT NOT NULL,
    epoch             INTEGER NOT NULL,
    model             TEXT NOT NULL,
    n_sms             INTEGER NOT NULL,
    repeated_sms      INTEGER NOT NULL,   -- SMS already in an earlier call
    sent_at           REAL NOT NULL,
    state             TEXT NOT NULL DEFAULT 'sent'
                      CHECK (state IN ('sent', 'answered', 'failed')),
    answered_at       REAL,
    request_id        TEXT,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    error             TEXT,
    flushed           INTEGER NOT NULL DEFAULT 0 CHECK (flushed IN (0, 1)),
    flushed_at        REAL,
    committed_at      REAL,               -- v2: see smsd.journal (answer -> commit latency)
    cached_tokens     INTEGER NOT NULL DEFAULT 0,
    cost_usd          TEXT NOT NULL DEFAULT '0',   -- Decimal as a string, never a float
    repeated_usd      TEXT NOT NULL DEFAULT '0'    -- cost_usd x repeated_sms / n_sms
) STRICT;
CREATE INDEX calls_unflushed ON calls (seq) WHERE state = 'answered' AND flushed = 0;

-- Which SMS each call asked about.
CREATE TABLE call_sms (
    call_id TEXT NOT NULL REFERENCES calls (call_id),
    sms_key TEXT NOT NULL,
    raw_id  BLOB NOT NULL,
    wire_id TEXT,               -- the SMS's id in that call's request ("1".."N")
    text_hash TEXT,             -- its answer-cache key (smsd.answer_cache), never the text
    PRIMARY KEY (call_id, sms_key)
) STRICT, WITHOUT ROWID;
CREATE INDEX call_sms_key ON call_sms (sms_key);

-- One row per answered SMS; the first answer wins.  Money is strings in JSON.
CREATE TABLE results (
    sms_key      TEXT PRIMARY KEY,
    call_id      TEXT NOT NULL REFERENCES calls (call_id),
    raw_id       BLOB NOT NULL,
    kind         TEXT NOT NULL,
    transactions TEXT NOT NULL
) STRICT;
CREATE INDEX results_call ON results (call_id);

-- Attempt counts of SMS whose answer was missing or invalid.
CREATE TABLE failures (
    sms_key    TEXT PRIMARY KEY,
    raw_id     BLOB,
    attempts   INTEGER NOT NULL,
    last_error TEXT,
    at         REAL NOT NULL
) STRICT;

-- Decided here first, written to MongoDB by the flush.
CREATE TABLE quarantine (
    sms_key    TEXT PRIMARY KEY,
    raw_id     BLOB NOT NULL,
    reason     TEXT NOT NULL,
    attempts   INTEGER NOT NULL,
    extra      TEXT NOT NULL,
    at         REAL NOT NULL,
    flushed    INTEGER NOT NULL DEFAULT 0 CHECK (flushed IN (0, 1)),
    flushed_at REAL
) STRICT;
""" + """
-- The bill per UTC day and model, updated in the commit of each answer.  Model
-- 'rules' and 'cache' rows count SMS answered without a paid call.  rev moves
-- with each update; synced_rev is the rev last written to MongoDB (smsd_llm_costs).
CREATE TABLE ledger (
    day               TEXT NOT NULL,
    model             TEXT NOT NULL,
    calls             INTEGER NOT NULL DEFAULT 0,
    sms               INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    cached_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd          TEXT NOT NULL DEFAULT '0',
    repeated_calls    INTEGER NOT NULL DEFAULT 0,
    repeated_sms      INTEGER NOT NULL DEFAULT 0,
    repeated_usd      TEXT NOT NULL DEFAULT '0',
    unpriced_calls    INTEGER NOT NULL DEFAULT 0,
    cache_races       INTEGER NOT NULL DEFAULT 0,   -- SMS paid while another call paid the same text
    rev               INTEGER NOT NULL DEFAULT 0,
    synced_rev        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, model)
) STRICT;
"""

#: ``{from_version: statements}``: what upgrades a journal of ``from_version`` by one
#: (run in the writer's one upgrade transaction, one statement at a time).
MIGRATIONS: dict[int, list[str]] = {
    1: ["ALTER TABLE calls ADD COLUMN committed_at REAL"],
    2: ["ALTER TABLE calls ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE calls ADD COLUMN cost_usd TEXT NOT NULL DEFAULT '0'",
        "ALTER TABLE calls ADD COLUMN repeated_usd TEXT NOT NULL DEFAULT '0'",
        "ALTER TABLE call_sms ADD COLUMN wire_id TEXT",
        "ALTER TABLE call_sms ADD COLUMN text_hash TEXT",
        SCHEMA[SCHEMA.index("CREATE TABLE ledger"):]],
}

def statements(script: str) -> list[str]:
    """The SQL statements of ``script``, one each, so they can run inside one transaction.

    ``executescript`` would COMMIT first and then run each statement in autocommit
    mode: one WAL commit (an fsync with ``synchronous=FULL``) per table, on every
    new user's first turn.
    """
    out, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    if current.strip():
        out.append(current.strip())
    return out


#: SMS results awaiting a flush (walks the partial index calls_unflushed).
UNFLUSHED_COUNT = ("SELECT COUNT(*) FROM results WHERE call_id IN"
                   " (SELECT call_id FROM calls WHERE state = 'answered' AND flushed = 0)")



def journal_path(state_dir: str | os.PathLike, user_id: str) -> Path:
    """``{state_dir}/journal/{quoted user id}.sqlite``; ids quoting to more than
    150 chars get ``sha256=<hex>.sqlite`` ('=' is always quoted, so the two
    kinds of name never collide)."""
    if not user_id:
        raise ValueError("user_id must not be empty")
    name = quote(user_id, safe="")
    if len(name) > MAX_NAME:
        name = "sha256=" + hashlib.sha256(user_id.encode("utf-8")).hexdigest()
    return Path(state_dir) / "journal" / f"{name}.sqlite"



#: Offsets 18 and 19 of a SQLite file's header: the file format write and read
#: versions, 2 for a database in WAL mode (what ``PRAGMA journal_mode = WAL`` writes;
#: https://www.sqlite.org/fileformat.html, "The Database Header").
_WAL_VERSIONS = slice(18, 20)

_image_lock = threading.Lock()
_image_db: tuple[int, sqlite3.Connection] | None = None   # (pid, in-memory journal)


def new_journal_image(user_id: str) -> bytes:
    """The file of a new, empty journal of ``user_id``: :data:`SCHEMA`, its ``meta``
    rows and WAL mode, as :func:`init_schema` would leave an empty file.

    Why an image: creating the schema costs SQLite a parse and a schema change per
    statement, about 2.5 ms of CPU per new user (a third of a small user's turn in
    a worker); a copy of the same pages costs a write.  The schema is built once
    per process in an in-memory database, and each image is that database with the
    user's ``meta`` rows, serialized.
    """
    global _image_db
    with _image_lock:
        # Per process: a connection inherited through fork() is not used.
        if _image_db is None or _image_db[0] != os.getpid():
            conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            for statement in statements(SCHEMA):
                conn.execute(statement)
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, '')",
                             [("schema_version",), ("user_id",), ("created_at",)])
            _image_db = (os.getpid(), conn)
        conn = _image_db[1]
        conn.executemany("UPDATE meta SET value = ? WHERE key = ?", [
            (str(SCHEMA_VERSION), "schema_version"), (user_id, "user_id"),
            (datetime.now(timezone.utc).isoformat(), "created_at")])
        image = bytearray(conn.serialize())
    image[_WAL_VERSIONS] = b"\x02\x02"
    return bytes(image)


def _scalar(db: JournalDb, sql: str, params: Iterable = ()) -> Any:
    return db.execute(sql, list(params)).fetchone()[0]


class JournalDb:
    """One SQLite connection of a journal, and the few calls smsd makes on it.

    A thin layer over :class:`sqlite3.Connection` opened in autocommit mode
    (``isolation_level=None``): every statement runs as written, transactions are
    the explicit ``BEGIN IMMEDIATE ... COMMIT`` of :meth:`smsd.journal.Journal._write`.
    (It replaced ``sqlite_utils.Database``, whose import alone cost every ``smsd run``
    a tenth of a second of its start, and which wrapped each query in a SAVEPOINT.)

    >>> db = JournalDb(sqlite3.connect(":memory:", isolation_level=None))
    >>> _ = db.execute("CREATE TABLE t (k TEXT, v INTEGER)")
    >>> _ = db.execute("INSERT INTO t VALUES (?, ?)", ["a", 1])
    >>> list(db.query("SELECT k, v FROM t"))
    [{'k': 'a', 'v': 1}]
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, parameters: Iterable | None = None) -> sqlite3.Cursor:
        """Run one statement; its cursor."""
        if parameters is None:
            return self.conn.execute(sql)
        return self.conn.execute(sql, parameters)

    def query(self, sql: str, params: Iterable = ()) -> Iterator[dict]:
        """The rows of a read, as dicts."""
        return iter(_rows(self, sql, params))

    def rollback(self) -> None:
        """Roll back the open transaction, if there is one."""
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


def _rows(db: JournalDb, sql: str, params: Iterable = ()) -> list[dict]:
    """The rows of a read, as dicts."""
    cursor = db.execute(sql, list(params))
    keys = [d[0] for d in cursor.description]
    return [dict(zip(keys, row)) for row in cursor.fetchall()]


def _tables(db: JournalDb) -> set[str]:
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()}


def _meta(db: JournalDb) -> dict[str, str]:
    return {r["key"]: r["value"] for r in _rows(db, "SELECT key, value FROM meta")}


def init_schema(db: JournalDb, path: Path, user_id: str) -> dict[str, str]:
    """Create or upgrade the schema, check the owner; the meta table as it now is."""
    if "meta" in _tables(db):
        meta = _meta(db)
        if meta.get("schema_version") == str(SCHEMA_VERSION) and meta.get("user_id") == user_id:
            # Nothing to write (a journal made from new_journal_image, or one reopened):
            # no write transaction.  The caller holds the writer's lock: nothing moves.
            return meta
    db.execute("BEGIN IMMEDIATE")
    try:
        if "meta" not in _tables(db):
            for statement in statements(SCHEMA):   # in this one transaction: one fsync
                db.execute(statement)
            db.conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [
                ("schema_version", str(SCHEMA_VERSION)), ("user_id", user_id),
                ("created_at", datetime.now(timezone.utc).isoformat())])
        meta = _meta(db)
        version = int(meta.get("schema_version", "0"))
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"{path}: journal schema version {version} is newer than this smsd "
                f"supports ({SCHEMA_VERSION}); upgrade smsd, do not delete the journal")
        if version < 1:
            raise JournalError(f"{path}: unknown journal schema version {version}")
        while version < SCHEMA_VERSION:   # upgrade in place, in this one transaction
            for statement in MIGRATIONS[version]:   # one at a time: executescript would COMMIT
                db.execute(statement)
            version += 1
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(version)])
            meta["schema_version"] = str(version)
        if meta.get("user_id") != user_id:
            raise JournalError(f"{path}: journal belongs to user "
                               f"{meta.get('user_id')!r}, not {user_id!r}")
        db.execute("COMMIT")
    except BaseException:
        db.rollback()
        raise
    return meta
