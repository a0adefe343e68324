"""The journal's files, its writer's lock, and its SQLite connections.

One process writes a user's journal: :func:`_take_lock` holds an exclusive
``flock`` on ``{path}.lock`` (:class:`JournalLocked` when another holds it).

Connections: one per thread, write transactions under one lock.

Why not one shared connection under one lock: the LLM thread commits a paid
answer the moment it arrives (DESIGN.md's crash table), and behind a shared lock
it waited for whatever the main loop was doing on the journal at that moment — a
flush reading and parsing up to 64 answers, the status line's counts, a claim's
key lists.  In WAL mode a reader never blocks the writer and sees every commit
made before its statement began, so each thread reads on its own connection
without any lock.  Write transactions still take one lock: SQLite has one
writer at a time anyway, and a Python lock hands it over the moment it is free,
where SQLite's busy handler would sleep and poll.

Every connection gets the same pragmas (WAL, ``busy_timeout``, the configured
``synchronous``): durability does not depend on which thread commits.
"""
from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import threading
import time
from pathlib import Path

from smsd.journal_schema import JournalDb

#: How long a writer waits for a SQLite lock held by a reader (checkpoints).
BUSY_TIMEOUT_MS = 5000
LOCK_POLL_S = 0.05


class JournalLocked(Exception):
    """Another process (or another Journal in this one) holds the user's journal."""

    def __init__(self, user_id: str, holder_pid: int | None):
        self.user_id = user_id
        self.holder_pid = holder_pid
        holder = f"pid {holder_pid}" if holder_pid else "another process"
        super().__init__(f"journal of user {user_id!r} is locked by {holder}")


def _chmod_600(path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            os.chmod(p, 0o600)
        except FileNotFoundError:
            pass


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (0600) holding ``data``, whole or not at all, durably.

    Written to ``{path}.new``, fsynced, renamed into place, the directory fsynced: a
    crash leaves either no file (and maybe a ``.new`` that the next call overwrites)
    or all of ``data``; never a half-written journal that would be refused as corrupt.
    """
    tmp = Path(f"{path}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    _fsync_dir(path.parent)


def _read_pid(fd: int) -> int | None:
    try:
        data = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(data) if data else None
    except (OSError, ValueError):
        return None


def _take_lock(lock_path: Path, user_id: str, wait: float) -> int:
    """flock(LOCK_EX) on ``lock_path``, retrying for ``wait`` seconds; returns the fd."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise JournalLocked(user_id, _read_pid(fd)) from None
                time.sleep(min(LOCK_POLL_S, max(0.0, deadline - time.monotonic())))
        # Only the holder writes, so the pid in the file names the holder.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        os.fchmod(fd, 0o600)
        return fd
    except BaseException:
        os.close(fd)
        raise


def connect(path: Path, synchronous: str) -> JournalDb:
    """One connection to the journal at ``path``, in WAL mode with ``synchronous``.

    Raises ``sqlite3.DatabaseError`` if the file is not a database, ``RuntimeError``
    if it cannot be switched to WAL.
    """
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT in
    # Journal._write), nothing is opened or committed behind our back.
    # check_same_thread=False only so that close() may close it from another thread.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                           timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        db = JournalDb(conn)
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"{path}: cannot switch to WAL mode (got {mode!r})")
        # FULL by default: in WAL mode, NORMAL does not fsync the WAL at each
        # commit, so a power loss or OS crash can lose the last commits.  A lost
        # commit is an LLM answer we paid for and would ask again (invariant 5).
        # NORMAL is only safe against process crashes (kill -9).
        db.execute(f"PRAGMA synchronous = {synchronous}")
    except BaseException:
        conn.close()
        raise
    return db


class Connections:
    """The journal's connections, one per thread that uses it, and its write lock.

    ``first`` is the connection the opening thread already made (schema checks);
    other threads get theirs on first use.  A connection of a thread that has
    ended is closed when the next one is made (a pipeline run's LLM threads end
    with the run; the journal may outlive several runs).
    """

    def __init__(self, path: Path, synchronous: str, first: JournalDb) -> None:
        self.path = path
        self.synchronous = synchronous
        #: Held for every write transaction (reentrant: a companion module's
        #: transaction may call the journal's own writers inside it).
        self.write_lock = threading.RLock()
        self._local = threading.local()
        self._local.db = first
        self._registry_lock = threading.Lock()
        self._all: list[tuple[threading.Thread, JournalDb]] = [
            (threading.current_thread(), first)]
        self._spare: list[JournalDb] = []   # let go by a thread done with the journal

    def prepare_committer(self) -> None:
        """Open the calling thread's connection now, ready for a commit that must be quick.

        Its commits run no automatic checkpoint (a checkpoint's two fsyncs would land
        inside an answer's commit); the connections of the threads that open and run
        the journal still checkpoint after their commits.  The schema is read now,
        not by the first answer's statements.
        """
        db = self.get(autocheckpoint=False)
        db.execute("SELECT 1 FROM calls LIMIT 0").fetchall()

    def get(self, *, autocheckpoint: bool = True) -> JournalDb:
        """The calling thread's connection (made on its first use)."""
        db = getattr(self._local, "db", None)
        if db is None:
            with self._registry_lock:
                db = self._spare.pop() if self._spare and autocheckpoint else None
            if db is None:
                db = connect(self.path, self.synchronous)
                if not autocheckpoint:
                    db.execute("PRAGMA wal_autocheckpoint = 0")
            with self._registry_lock:
                alive = []
                for thread, other in self._all:
                    if thread.is_alive():
                        alive.append((thread, other))
                    else:
                        other.close()
                self._all = alive + [(threading.current_thread(), db)]
            self._local.db = db
        return db

    def release(self) -> None:
        """The calling thread is done with the journal: its connection goes to the next
        thread that asks for an ordinary one, instead of that thread connecting anew.

        A group turn opens each journal in an opener thread and runs it in a member
        thread: a connection (and its first statements' schema read) less per user.
        A connection is never used by two threads at once: the releasing thread has let
        go of it before another can take it.
        """
        db = getattr(self._local, "db", None)
        if db is None:
            return
        self._local.db = None
        with self._registry_lock:
            self._all = [(thread, other) for thread, other in self._all if other is not db]
            self._spare.append(db)

    def count(self) -> int:
        """Connections open now (for tests)."""
        with self._registry_lock:
            return len(self._all) + len(self._spare)

    def close(self) -> None:
        """Close every connection (the caller holds the write lock)."""
        with self._registry_lock:
            conns = [db for _, db in self._all] + self._spare
            self._all, self._spare = [], []
        for db in conns:
            db.close()
