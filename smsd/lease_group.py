"""The leases of a group turn's users, taken, renewed and released together.

A trickle group turn (:mod:`smsd.worker_group`) holds up to a dozen leases at
once; taking, renewing and releasing each on its own was one MongoDB command
per user for each of them.  Here each is one command for the whole group (one
per distinct epoch for renewals and releases; a single host has only epoch 1):

* :func:`take_many` -- one ``find`` of the users' leases, then what the single
  take's pipeline upsert (:meth:`smsd.lease.Leases.take_filter` /
  :meth:`~smsd.lease.Leases.take_update`) would do, in the cheapest command for
  each kind of lease: users without one get its first document in one
  ``insert`` (:meth:`~smsd.lease.Leases.first_doc`), leases already ours get
  their new expiry in one ``update_many`` (the pipeline keeps their epoch,
  stamp and ``taken_at``), and only the rest (expired leases of another host,
  a document that appeared since the read) go through the pipeline upserts,
  where a lease another host holds collides on ``_id`` (a write error of that
  op only).  One ``find`` then reads back which leases are ours and at which
  epoch.  On the MongoDB-wire server a pipeline upsert costs several times an
  insert or a plain ``$set`` per document, and a steady single host only ever
  has the first two kinds.
* :class:`GroupKeeper` -- one thread renewing every lease of the group in one
  ``update_many``.  Every lease of the group carries the same ``expires_at``
  (the take's and each renewal's one value, in whole milliseconds as MongoDB
  stores it), and the renewal and the release match on it exactly: a lease this
  host took again meanwhile in another turn (a member whose turn is over) has
  another ``expires_at`` and is left alone, as is a lease another host took.
  Each member sees its own :class:`MemberKeeper` (``fresh``, ``lost``) with the
  single keeper's meaning (:class:`smsd.lease.LeaseKeeper`).
* :func:`release_many` -- the epilogue's one ``update_many`` giving back the
  leases of the members that completed.

Crash windows: a kill after :func:`take_many` leaves the leases held by this
host until they expire; the next turn of this host takes its own back at once
(the take's filter matches its own holder), and another host waits for the
expiry, as after a kill of a single turn.
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta
from typing import Callable

from pymongo import InsertOne, UpdateOne
from pymongo.errors import BulkWriteError

from .lease import _EPOCH0, Lease, Leases
from .store_errors import DUPLICATE_KEY, bulk_created

log = logging.getLogger("smsd.lease")


def _whole_ms(t: datetime) -> datetime:
    """``t`` cut to milliseconds: what MongoDB stores, so an exact match finds it again."""
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def take_many(leases: Leases, user_ids: list[str]) -> tuple[dict[str, Lease], datetime]:
    """Take the leases of ``user_ids`` at once: ``({user_id: Lease} of those now ours, expires_at)``.

    Users missing from the answer are held by another host.  Two to five
    commands whatever the number of users.
    """
    now = _whole_ms(leases.now())
    expires = now + leases.ttl
    seen = {doc["_id"]: doc for doc in leases.coll.find({"_id": {"$in": list(user_ids)}},
                                                         {"owner": 1, "taken_at": 1})}
    mine = [u for u in user_ids if u in seen and seen[u].get("owner") == leases.host
            and seen[u].get("taken_at") is not None]
    rest = [u for u in user_ids if u in seen and u not in mine]
    new = [u for u in user_ids if u not in seen]
    if new:
        rest += _insert_first(leases, new, now)
    if mine:
        # Ours whatever its expiry (the take's filter): only the expiry moves. A lease
        # another host took since the read no longer matches, and the read-back says so.
        leases.coll.update_many({"_id": {"$in": mine}, "owner": leases.host}, {"$set": {"expires_at": expires}})
    if rest:
        update = leases.take_update(now)
        _tolerate_held(lambda: leases.coll.bulk_write(
            [UpdateOne(leases.take_filter(u, now), update, upsert=True) for u in rest], ordered=False))
    ours = {}
    for doc in leases.coll.find({"_id": {"$in": list(user_ids)}}):
        lease = Lease.from_doc(doc)
        if lease.owner == leases.host and lease.expires_at == expires:
            ours[lease.user_id] = lease
    return ours, expires


def _insert_first(leases: Leases, user_ids: list[str], now: datetime) -> list[str]:
    """Insert the first lease of each of ``user_ids``; those whose ``_id`` exists by now
    (another host, or another turn of ours, created it since the read) are returned."""
    created = bulk_created(leases.coll, [InsertOne(leases.first_doc(u, now)) for u in user_ids])
    return [u for i, u in enumerate(user_ids) if i not in created]


def _tolerate_held(write: Callable[[], object]) -> None:
    """Run a bulk take; a lease another host holds (its upsert's duplicate key) is no error."""
    try:
        write()
    except BulkWriteError as exc:
        if any(e.get("code") != DUPLICATE_KEY for e in exc.details.get("writeErrors", [])):
            raise   # not "held by another host": a real failure


def _by_epoch(held: dict[str, Lease]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for user_id, lease in held.items():
        out.setdefault(lease.epoch, []).append(user_id)
    return out


def renew_many(leases: Leases, held: dict[str, Lease], expires: datetime) -> tuple[set[str], datetime]:
    """Extend every lease of ``held`` still ours at ``expires``; ``(users no longer ours, new expires_at)``."""
    new = _whole_ms(leases.now()) + leases.ttl
    matched = 0
    for epoch, ids in _by_epoch(held).items():
        matched += leases.coll.update_many(
            {"_id": {"$in": ids}, "owner": leases.host, "epoch": epoch, "expires_at": expires},
            {"$set": {"expires_at": new}}).matched_count
    if matched == len(held):
        return set(), new
    still = {doc["_id"] for doc in leases.coll.find({"_id": {"$in": list(held)}, "expires_at": new},
                                                     {"owner": 1, "epoch": 1})
             if doc.get("owner") == leases.host and doc.get("epoch") == held[doc["_id"]].epoch}
    return set(held) - still, new


def release_many(leases: Leases, held: dict[str, Lease], expires: datetime) -> int:
    """Give back the leases of ``held`` that are still ours at ``expires``; how many were."""
    released = 0
    for epoch, ids in _by_epoch(held).items():
        released += leases.coll.update_many(
            {"_id": {"$in": ids}, "owner": leases.host, "epoch": epoch, "expires_at": expires},
            {"$set": {"expires_at": _EPOCH0}}).modified_count
    return released


class MemberKeeper:
    """One member's view of the group's renewals (what :class:`smsd.lease.LeaseKeeper` offers it)."""

    def __init__(self, group: "GroupKeeper", lease: Lease, on_lost: Callable[[str], None]) -> None:
        self.group = group
        self.lease = lease
        self.on_lost = on_lost
        self.lost: str | None = None
        self.active = True       # False once the member's turn stopped renewing

    def fresh(self) -> bool:
        """Whether the lease is surely still ours (the single keeper's rule, from the group's renewal)."""
        g = self.group
        return self.lost is None and time.monotonic() - g.last_ok < g.ttl - g.every

    def stop(self, wait: float = 5.0) -> None:
        """This member's turn is over: its lease is no longer its to lose (the group keeps
        renewing it until the epilogue releases it, so the release matches it)."""
        self.active = False

    def _lose(self, why: str) -> None:
        if self.lost is None and self.active:
            self.lost = why
            log.warning("user %s: lease (epoch %d) lost: %s", self.lease.user_id, self.lease.epoch, why)
            self.on_lost(why)


class GroupKeeper(threading.Thread):
    """Renews all of a group's leases every ``ttl * fraction`` seconds, one command per period."""

    def __init__(self, leases: Leases, held: dict[str, Lease], expires: datetime, *, ttl: float,
                 fraction: float, taken_at: float, errors: tuple[type[BaseException], ...]) -> None:
        super().__init__(name="smsd-lease-group", daemon=True)
        self.leases = leases
        self.held = dict(held)     # every lease still ours (members over included, until released)
        self.expires = expires
        self.ttl = ttl
        self.every = max(0.05, ttl * fraction)
        self.errors = errors
        self.last_ok = taken_at
        self.members: dict[str, MemberKeeper] = {}
        self.halt = threading.Event()
        self._lock = threading.Lock()   # a renewal and the release never run at once

    def member(self, user_id: str, on_lost: Callable[[str], None]) -> MemberKeeper:
        """The keeper view of ``user_id`` (its lease must be in the group's)."""
        view = MemberKeeper(self, self.held[user_id], on_lost)
        self.members[user_id] = view
        return view

    def run(self) -> None:
        while not self.halt.wait(self.every):
            sent = time.monotonic()   # counted from the send, as the single keeper does
            with self._lock:
                if self.halt.is_set() or not self.held:
                    return
                try:
                    gone, self.expires = renew_many(self.leases, self.held, self.expires)
                except self.errors as exc:
                    if time.monotonic() - self.last_ok > self.ttl:
                        for view in list(self.members.values()):
                            view._lose(f"not renewed for {self.ttl:.0f} s ({type(exc).__name__})")
                        return
                    continue
                for user_id in gone:
                    self.held.pop(user_id, None)
                    if user_id in self.members:
                        self.members[user_id]._lose("taken by another host")
                for lease in self.held.values():
                    lease.expires_at = self.expires
                self.last_ok = sent

    def release(self, user_ids: list[str]) -> int:
        """Stop renewing, then give back the leases of ``user_ids`` that are still ours (one command)."""
        self.halt.set()
        with self._lock:
            held = {u: self.held[u] for u in user_ids if u in self.held}
            if not held:
                return 0
            return release_many(self.leases, held, self.expires)

    def stop(self) -> None:
        """Stop renewing (the leases expire by themselves)."""
        self.halt.set()
        with self._lock:
            pass
