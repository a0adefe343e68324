"""Per-user leases in MongoDB: who works on a user when several hosts share one database.

One document per user in ``smsd_leases``::

    {_id: user_id, owner: host_id, epoch: int, expires_at: datetime, taken_at: datetime,
     stamped: bool}

* **take** is one atomic ``find_one_and_update`` whose filter only matches a
  lease that is ours or expired (released leases are expired ones); its
  pipeline update raises ``epoch`` by one whenever the owner changes, and keeps
  it when the same host takes its own lease again.  A user without a lease
  document gets one (owner ``""``, epoch 0, already expired) and is then taken
  like any free lease, so the first owner has epoch 1.  A single host keeps
  epoch 1 for ever.
* **renew** moves ``expires_at`` of a lease that is still ours at the epoch we
  hold (a filter on ``owner`` and ``epoch``); 0 matched means it was taken.
* **release** expires our lease at once, keeping owner and epoch, so the next
  taker's epoch is higher.
* Every time is the server's: a host reads the server's clock (``hello``'s
  ``localTime``) and works with its offset, so hosts' own clocks do not matter
  for who may take what.  (SecantusDB 0.7 evaluates ``$$NOW`` in an update but
  its ``$expr`` comparisons with ``$$NOW`` never match, so filters carry the
  time as a value.)

``stamped`` says whether the owner has stamped its epoch on the user's pending
SMS and in-progress checkpoint yet (:func:`smsd.fencing.stamp_user`): a new
epoch starts unstamped, and the worker stamps before its first LLM call.

``smsd_hosts`` holds one heartbeat document per live host (``_id``: host id,
``expires_at``, ``free_slots``), written by every discovery; it tells a host how
many hosts share the free leases (:func:`free_quota`).

The host id (:func:`host_id`) is kept in ``<state_dir>/host_id``: it survives
restarts of the same host, so a restarted host takes its own leases back
without raising their epochs (its journal lock already keeps two of its own
workers from one user).
"""
from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from pymongo import ReturnDocument
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

LEASES_COLLECTION = "smsd_leases"
HOSTS_COLLECTION = "smsd_hosts"
HOST_ID_FILE = "host_id"
_EPOCH0 = datetime(1970, 1, 1, tzinfo=timezone.utc)

log = logging.getLogger("smsd.lease")

#: ``id(MongoClient) -> (server clock - ours, when measured)``, see :meth:`Leases.now`.
_OFFSETS: dict[int, tuple[timedelta | None, float]] = {}


def host_id(state_dir: str | os.PathLike) -> str:
    """This host's id, created once in ``state_dir/host_id`` (hostname plus a random tag)."""
    path = Path(state_dir) / HOST_ID_FILE
    try:
        value = path.read_text(encoding="utf-8").strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    value = f"{socket.gethostname()[:40]}-{uuid.uuid4().hex[:8]}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return value


@dataclass
class Lease:
    """One user's lease as read from MongoDB."""

    user_id: str
    owner: str
    epoch: int
    expires_at: datetime | None
    stamped: bool = False

    @classmethod
    def from_doc(cls, doc: dict) -> "Lease":
        return cls(user_id=doc["_id"], owner=doc.get("owner", ""), epoch=int(doc.get("epoch", 0)),
                   expires_at=doc.get("expires_at"), stamped=bool(doc.get("stamped")))

    def public(self) -> dict:
        """The contract's ``leases`` row: ``user_id, owner, epoch, expires_at`` (ISO 8601)."""
        exp = self.expires_at.isoformat() if self.expires_at else None
        return {"user_id": self.user_id, "owner": self.owner, "epoch": self.epoch, "expires_at": exp}


class Leases:
    """Take, renew and release this host's leases (each a single-document atomic update)."""

    def __init__(self, db: Database, host: str, ttl: float) -> None:
        self.db = db
        self.host = host
        self.ttl_ms = int(ttl * 1000)
        self.ttl = timedelta(milliseconds=self.ttl_ms)

    def now(self) -> datetime:
        """The server's time, from our clock and the offset measured every minute.

        The offset is kept per MongoClient across :class:`Leases` objects: a worker
        makes one per turn, and a ``hello`` per turn is a round trip a 3-SMS turn
        does not need.
        """
        key = id(self.db.client)
        offset, at = _OFFSETS.get(key, (None, 0.0))
        if offset is None or time.monotonic() - at > 60:
            before = datetime.now(timezone.utc)
            server = self.db.client.admin.command("hello")["localTime"]
            after = datetime.now(timezone.utc)
            if server.tzinfo is None:
                server = server.replace(tzinfo=timezone.utc)
            offset = server - (before + (after - before) / 2)
            _OFFSETS[key] = (offset, time.monotonic())
        return datetime.now(timezone.utc) + offset

    @property
    def coll(self):
        return self.db[LEASES_COLLECTION]

    def take(self, user_id: str) -> Lease | None:
        """Take (or keep) the lease of ``user_id``; ``None`` while another host holds it.

        One ``findAndModify`` with ``upsert``: a user without a lease document gets
        one at epoch 1; a document held by another host does not match, so the
        upsert's insert collides with it on ``_id`` and the answer is ``None``.
        """
        now = self.now()
        try:
            doc = self.coll.find_one_and_update(
                self.take_filter(user_id, now), self.take_update(now),
                upsert=True, return_document=ReturnDocument.AFTER)
        except DuplicateKeyError:
            return None   # it exists and is not free: another host holds it
        return Lease.from_doc(doc) if doc is not None else None

    def take_filter(self, user_id: str, now: datetime) -> dict:
        """The take's filter: the lease is ours, or expired (released leases are expired)."""
        return {"_id": user_id, "$or": [{"owner": self.host}, {"expires_at": {"$lt": now}}]}

    def take_update(self, now: datetime) -> list[dict]:
        """The take's pipeline update (shared by :meth:`take` and the group's bulk take)."""
        mine = {"$eq": ["$owner", self.host]}
        return [{"$set": {
            # One $set stage: "$owner" and "$epoch" are the values before the update.
            "epoch": {"$cond": [mine, "$epoch", {"$add": [{"$ifNull": ["$epoch", 0]}, 1]}]},
            # The first epoch needs no stamp: no lease holder ever wrote before it,
            # so no write can carry a lower epoch (3 commands less per new user).
            "stamped": {"$cond": [mine, {"$ifNull": ["$stamped", False]},
                                  {"$eq": [{"$ifNull": ["$epoch", 0]}, 0]}]},
            "taken_at": {"$cond": [mine, {"$ifNull": ["$taken_at", now]}, {"$literal": now}]},
            "owner": {"$literal": self.host},
            "expires_at": {"$literal": now + self.ttl},
        }}]

    def first_doc(self, user_id: str, now: datetime) -> dict:
        """The document :meth:`take_update` makes where ``user_id`` has none (epoch 1, stamped:
        nothing was ever written before the first epoch), for an insert in its place."""
        return {"_id": user_id, "epoch": 1, "stamped": True, "taken_at": now, "owner": self.host,
                "expires_at": now + self.ttl}

    def renew(self, lease: Lease) -> Lease | None:
        """Extend ``lease`` by the TTL; ``None`` when it is no longer ours at that epoch."""
        # Not a released one: a renewal racing the worker's release must not take it back.
        doc = self.coll.find_one_and_update(
            {"_id": lease.user_id, "owner": self.host, "epoch": lease.epoch,
             "expires_at": {"$gt": _EPOCH0}},
            {"$set": {"expires_at": self.now() + self.ttl}}, return_document=ReturnDocument.AFTER)
        return Lease.from_doc(doc) if doc else None

    def mark_stamped(self, lease: Lease) -> bool:
        """Record that ``lease``'s epoch is stamped on the user's documents."""
        res = self.coll.update_one({"_id": lease.user_id, "owner": self.host, "epoch": lease.epoch},
                                   {"$set": {"stamped": True}})
        return res.matched_count == 1

    def release(self, user_id: str, epoch: int | None = None) -> bool:
        """Give our lease of ``user_id`` back now (it expires; owner and epoch stay)."""
        flt: dict[str, Any] = {"_id": user_id, "owner": self.host}
        if epoch is not None:
            flt["epoch"] = epoch
        return self.coll.update_one(flt, {"$set": {"expires_at": _EPOCH0}}).matched_count == 1

    def read(self, user_ids: Iterable[str]) -> dict[str, dict]:
        """``{user_id: {owner, epoch, expires_at, free}}`` for the users that have a lease document.

        ``free``: expired or released, by the server's clock.
        """
        ids = list(user_ids)
        out: dict[str, dict] = {}
        now = self.now()
        for start in range(0, len(ids), 500):
            for doc in self.coll.find({"_id": {"$in": ids[start:start + 500]}}):
                out[doc["_id"]] = self._row(doc, now)
        return out

    @staticmethod
    def _row(doc: dict, now: datetime) -> dict:
        lease = Lease.from_doc(doc)
        exp = lease.expires_at
        if exp is not None and exp.tzinfo is None:
            exp = exp.replace(tzinfo=timezone.utc)
        return dict(lease.public(), free=exp is None or exp < now)

    def read_owned(self) -> list[dict]:
        """This host's lease documents (expired ones too, with ``free``)."""
        now = self.now()
        return [self._row(doc, now) for doc in self.coll.find({"owner": self.host})]

    def heartbeat(self, free_slots: int, ttl_ms: int | None = None) -> int:
        """Say this host is alive (``smsd_hosts``); return how many hosts are alive, us included."""
        hosts = self.db[HOSTS_COLLECTION]
        now = self.now()
        hosts.update_one({"_id": self.host},
                         {"$set": {"expires_at": now + timedelta(milliseconds=ttl_ms or self.ttl_ms),
                                   "free_slots": int(free_slots)}}, upsert=True)
        return max(1, int(hosts.count_documents({"expires_at": {"$gt": now}})))


def free_quota(free_users: int, live_hosts: int) -> int:
    """How many free leases one host may take per discovery: its share, rounded up."""
    return math.ceil(free_users / max(1, live_hosts)) if free_users else 0


def preference(host: str, user_id: str) -> int:
    """Rendezvous rank of ``user_id`` for ``host``: hosts sort free users differently, so they collide less."""
    return zlib.crc32(f"{host}\0{user_id}".encode())


class LeaseKeeper(threading.Thread):
    """A worker's lease renewal thread: renews every ``ttl * fraction`` seconds.

    ``on_lost`` is called once when the lease is gone: taken by a newer epoch,
    or not renewed for a whole TTL (MongoDB out of reach: assume another host
    has it).  The worker then drains; what it still flushes is checked by
    MongoDB itself (:mod:`smsd.fencing`), so a late renewal does no harm.
    """

    def __init__(self, leases: Leases, lease: Lease, *, ttl: float, fraction: float,
                 on_lost: Callable[[str], None], errors: tuple[type[BaseException], ...]) -> None:
        super().__init__(name="smsd-lease", daemon=True)
        self.leases = leases
        self.lease = lease
        self.ttl = ttl
        self.every = max(0.05, ttl * fraction)
        self.on_lost = on_lost
        self.errors = errors
        self.lost: str | None = None
        self.last_ok = time.monotonic()
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.every):
            # The server extends the lease from when it runs the renewal, never before
            # we sent it: counting from the send keeps fresh() on the safe side.
            sent = time.monotonic()
            try:
                renewed = self.leases.renew(self.lease)
            except self.errors as exc:
                if time.monotonic() - self.last_ok > self.ttl:
                    self._lose(f"not renewed for {self.ttl:.0f} s ({type(exc).__name__})")
                    return
                continue
            if renewed is None:
                if self.halt.is_set():
                    return      # stopped meanwhile: the worker released it
                self._lose("taken by another host")
                return
            self.lease = renewed
            self.last_ok = sent

    def fresh(self) -> bool:
        """Whether the lease is surely still ours: not lost, and renewed less than
        ``ttl - every`` ago (by our clock, from the renewal's send).  A host cut off from
        MongoDB stops paying before another host can take its users, so what both pay
        for is at most what was in flight then."""
        return self.lost is None and time.monotonic() - self.last_ok < self.ttl - self.every

    def _lose(self, why: str) -> None:
        self.lost = why
        log.warning("user %s: lease (epoch %d) lost: %s", self.lease.user_id, self.lease.epoch, why)
        self.on_lost(why)

    def stop(self, wait: float = 5.0) -> None:
        """Stop renewing; wait (bounded) for a renewal in flight, so none lands after a release."""
        self.halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(wait)


def turn_kind(lease: dict | None, host: str, unflushed: int, handed_epoch: int | None) -> str | None:
    """Whether this host may start a worker for a user, from the lease the last discovery read.

    ``"mine"``: our lease (held or expired: taking it back keeps its epoch);
    ``"free"``: no lease, expired or released (counts against the host's share,
    :func:`free_quota`); ``"handover"``: another host holds it and we hold paid
    answers we have not handed over at this epoch (the worker hands them over
    and exits); ``None``: another host holds it.  The worker's atomic take is
    what decides; this only keeps hosts from asking for what they cannot get.
    """
    if not lease:
        return "free"
    if lease.get("owner") == host:
        return "mine"
    if lease.get("free"):
        return "free"
    if unflushed and handed_epoch != lease.get("epoch"):
        return "handover"
    return None
