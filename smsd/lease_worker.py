"""A worker's side of the lease: take it before any paid call, keep it, give it back.

:class:`WorkerLease` is what :mod:`smsd.worker` calls, in this order:

1. :meth:`acquire` -- take the user's lease (waiting while MongoDB is out of
   reach: no lease, no LLM call).  Held by another host: the worker hands over
   the journal's unflushed answers (:mod:`smsd.handover`) and exits.
2. :meth:`prepare` -- fence the store with the lease's epoch, and, for a new
   epoch, stamp it on the user's pending SMS and open checkpoints
   (:meth:`smsd.fencing.FencedStore.stamp_user`) before anything else.
3. :meth:`keep` -- the renewal thread (:class:`smsd.lease.LeaseKeeper`); a lost
   lease drains the worker.  Its flushes are refused by MongoDB from then on.
4. :meth:`release` -- when the user is done or the worker was drained, the
   lease is given back at once so another host can take the user.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from pymongo.errors import PyMongoError

from .config import Settings
from .fencing import FencedStore
from .handover import Handover, hand_over
from .journal import Journal
from .lease import Lease, LeaseKeeper, Leases, host_id
from .store_errors import StoreUnavailable

log = logging.getLogger("smsd.lease")

MONGO_ERRORS = (PyMongoError, StoreUnavailable)


class WorkerLease:
    """The lease of one worker's user."""

    def __init__(self, settings: Settings, store: FencedStore, user_id: str) -> None:
        self.settings = settings
        self.store = store
        self.user_id = user_id
        self.host = host_id(settings.state_dir)
        self.lease: Lease | None = None
        self.keeper: LeaseKeeper | None = None
        self._leases: Leases | None = None
        self.taken_at = time.monotonic()
        self.down_since: float | None = None   # acquire: MongoDB out of reach since (monotonic)
        self.down_error: str | None = None

    @property
    def leases(self) -> Leases:
        if self._leases is None:
            self._leases = Leases(self.store._database(), self.host, self.settings.lease.ttl)
        return self._leases

    def acquire(self, stop: threading.Event, beat: Callable[[str], None]) -> bool:
        """Take the lease; False when another host holds it or we were stopped first."""
        warned = False
        while not stop.is_set():
            beat("lease")
            try:
                self.taken_at = time.monotonic()   # the lease runs from no earlier than this
                self.lease = self.leases.take(self.user_id)
                self.down_since = None
                return self.lease is not None
            except MONGO_ERRORS as exc:
                if self.down_since is None:
                    self.down_since = time.monotonic()
                self.down_error = type(exc).__name__
                if not warned:
                    log.warning("user %s: cannot take the lease, MongoDB unavailable (%s); waiting",
                                self.user_id, type(exc).__name__)
                    warned = True
                self._leases = None
                stop.wait(0.5)
        return False

    def prepare(self) -> None:
        """Fence the store with our epoch; stamp it first if the epoch is new."""
        assert self.lease is not None
        self.store.set_epoch(self.lease.epoch)
        if not self.lease.stamped:
            n = self.store.stamp_user(self.user_id)
            self.leases.mark_stamped(self.lease)
            log.info("user %s: lease taken at epoch %d (%d pending SMS stamped)", self.user_id,
                     self.lease.epoch, n)

    def keep(self, on_lost: Callable[[str], None]) -> None:
        """Start renewing the lease in a thread."""
        assert self.lease is not None
        s = self.settings.lease
        self.keeper = LeaseKeeper(self.leases, self.lease, ttl=s.ttl, fraction=s.renew_fraction,
                                  on_lost=on_lost, errors=MONGO_ERRORS)
        self.keeper.last_ok = self.taken_at
        self.keeper.start()

    def may_pay(self) -> bool:
        """Whether a paid call may start now: the lease is surely still ours (see
        :meth:`smsd.lease.LeaseKeeper.fresh`)."""
        return self.keeper is None or self.keeper.fresh()

    @property
    def lost(self) -> str | None:
        """Why the lease was lost, or None while it is held."""
        return self.keeper.lost if self.keeper else None

    def status(self) -> dict:
        """The lease for the worker's status line (``owner, epoch, expires_at``)."""
        lease = self.keeper.lease if self.keeper else self.lease
        return lease.public() if lease else {}

    def handover(self) -> Handover:
        """The new owner's side of :mod:`smsd.handover` for this user."""
        return Handover(self.store._database(), self.user_id)

    def hand_over(self, journal: Journal) -> int:
        """Give the journal's unflushed answers to whoever holds the user now (best effort)."""
        if not journal.unflushed_count():
            return 0
        epoch = self.lease.epoch if self.lease else 0
        try:
            return hand_over(self.store._database(), journal, self.user_id, owner=self.host, epoch=epoch)
        except MONGO_ERRORS as exc:
            log.warning("user %s: handover failed (%s); the answers stay in the journal",
                        self.user_id, type(exc).__name__)
            return 0

    def stop(self) -> None:
        """Stop renewing (before the worker exits)."""
        if self.keeper:
            self.keeper.stop()

    def holder(self) -> Lease | None:
        """The lease as MongoDB has it now (who holds the user), or None when there is none."""
        doc = self.leases.coll.find_one({"_id": self.user_id})
        return Lease.from_doc(doc) if doc else None

    def release(self) -> None:
        """Give the lease back now, if it is still ours at our epoch."""
        if self.lease is None or self.lost:
            return
        try:
            if self.leases.release(self.user_id, self.lease.epoch):
                log.info("user %s: lease (epoch %d) released", self.user_id, self.lease.epoch)
        except MONGO_ERRORS as exc:
            log.warning("user %s: lease not released (%s); it expires in %.0f s", self.user_id,
                        type(exc).__name__, self.settings.lease.ttl)
