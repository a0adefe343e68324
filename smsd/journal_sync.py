"""The journal's WAL fsync, off the committing thread: an answer's commit waits for no disk.

With ``journal.synchronous = "FULL"`` and ``journal.background_sync = true`` (the
defaults) the journal's connections commit at SQLite's ``synchronous = NORMAL``:
in WAL mode the commit's frames are written to the ``-wal`` file (the operating
system's page cache) before ``COMMIT`` returns, so a SIGKILL of smsd right after
it cannot lose the answer — the kernel still holds and writes it.  A power loss
or an OS crash could, until the file is fsynced; :class:`WalSyncer` does that at
once, in its own thread: each commit wakes it, one fsync covers every commit
written before it (commits that arrive together share it), and
:meth:`WalSyncer.wait` lets a reader wait until what it read is on disk.

The journal's readers whose rows go to MongoDB (``Journal.unflushed``,
``Journal.unflushed_quarantine``) wait for it, so nothing reaches MongoDB before
the journal row it depends on would survive a power loss: invariant 1 holds as it
did with every commit at ``FULL``, and the window in which a power loss loses a
committed answer is still one fsync.  What changed is who waits for that fsync:
not the LLM thread that received the answer (issue 12, item 1: the disk's fsync
latency under load was the largest part of its answer → commit time).

SQLite's checkpoints still fsync the WAL before copying it into the database
file and the database file after, at ``NORMAL`` as at ``FULL``.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("smsd.journal")


class JournalSyncError(OSError):
    """The WAL could not be fsynced: what was committed since may not survive a power loss."""


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0) | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WalSyncer:
    """Fsyncs ``{db}-wal`` after commits, in a daemon thread; readers wait on it.

    Commits are counted: :meth:`committed` (called when a ``COMMIT`` returned) gives
    the commit its number; :meth:`wait` blocks until every commit up to a number is
    fsynced.  Thread-safe.
    """

    def __init__(self, db_path: Path) -> None:
        self.wal = Path(f"{db_path}-wal")
        self._cond = threading.Condition()
        self._committed = 0
        self._synced = 0
        self._syncs = 0
        self._error: OSError | None = None
        self._closing = False
        self._dir_synced = False
        self._thread = threading.Thread(target=self._run, name="smsd-journal-sync", daemon=True)
        self._thread.start()

    def committed(self) -> int:
        """A commit's ``COMMIT`` returned: count it, wake the syncer; returns its number."""
        with self._cond:
            self._committed += 1
            self._cond.notify_all()
            return self._committed

    def mark(self) -> int:
        """The number of the last commit so far (what a reader starting now may see)."""
        with self._cond:
            return self._committed

    def wait(self, upto: int | None = None) -> None:
        """Block until commits up to ``upto`` (default: all so far) are fsynced.

        Raises :class:`JournalSyncError` if an fsync failed (nothing after it is
        known to be on disk: do not write it anywhere else)."""
        with self._cond:
            target = self._committed if upto is None else upto
            while self._synced < target:
                if self._error is not None:
                    raise JournalSyncError(f"{self.wal}: fsync failed: {self._error}")
                self._cond.wait(1.0)

    @property
    def syncs(self) -> int:
        """Fsyncs done so far (fewer than commits when commits came together)."""
        with self._cond:
            return self._syncs

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._synced >= self._committed and not self._closing:
                    self._cond.wait()
                if self._synced >= self._committed:   # closing, nothing left
                    return
                target = self._committed
            try:
                self._sync()
            except OSError as exc:
                log.error("journal: fsync of %s failed (%s); its answers are not flushed until "
                          "the journal is reopened", self.wal, exc)
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                self._synced = target
                self._syncs += 1
                self._cond.notify_all()

    def _sync(self) -> None:
        try:
            _fsync_path(self.wal)
        except FileNotFoundError:
            return   # no WAL: SQLite checkpointed and removed it, which synced the database
        if not self._dir_synced:
            # The WAL file's directory entry, once: without it a power loss could lose the file.
            _fsync_path(self.wal.parent, directory=True)
            self._dir_synced = True

    def close(self) -> None:
        """Fsync what is left, then stop the thread.  Idempotent."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
