"""The supervisor's side of the leases: what it knows of them and which users it may start.

:class:`LeaseView` is what :class:`smsd.supervisor.Supervisor` keeps between
discoveries: this host's id, the leases it holds, how many hosts are alive and
how many free leases it may still take before the next discovery.  The
functions decide on plain :class:`~smsd.scheduler.UserState` data, like
:mod:`smsd.scheduler` does (no processes, no MongoDB): which of the
scheduler's candidates get a worker (:func:`lease_turns`), what a discovery's
lease reads mean (:meth:`LeaseView.seen`) and what a worker that found its
user elsewhere leaves behind (:func:`lease_moved`).
"""
from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .lease import free_quota, host_id, preference, turn_kind
from .scheduler import UserState, unflushed

__all__ = ["LeaseView", "host_id", "lease_moved", "lease_turns", "release_user"]

log = logging.getLogger("smsd.supervisor")


def lease_turns(candidates: list, host: str, room: int, quota: int,
                owed: Callable[[Any], int] = unflushed) -> tuple[list, int]:
    """Which of the scheduler's candidates (fairest first) get a worker now, and the quota left.

    The fair order is kept; users whose lease another host holds are skipped;
    free leases count against this host's share per discovery (``quota``) and
    among themselves go in this host's rendezvous order (:func:`preference`).
    """
    turns = []
    for user in candidates:
        kind = turn_kind(user.info.get("lease"), host, owed(user), user.handed_epoch)
        if kind is not None:
            turns.append((user, kind == "free"))
    free = iter(sorted((u for u, is_free in turns if is_free), key=lambda u: preference(host, u.user_id)))
    out = []
    for user, is_free in turns:
        if len(out) >= room:
            break
        if is_free:
            if quota <= 0:
                continue
            quota -= 1
            user = next(free)
        out.append(user)
    return out, quota



def lease_moved(user: UserState, pid: int, *, stale: bool) -> None:
    """A worker exited because another host has the user: wait for a discovery that says it is free."""
    lease = user.info.get("lease") or {}
    user.handed_epoch = lease.get("epoch")   # its paid answers are handed over at that epoch
    user.info["lease"] = {"owner": "(another host)", "epoch": lease.get("epoch"), "free": False}
    user.last_exit = "lease lost (stale epoch)" if stale else "leased elsewhere"
    user.consecutive_crashes = 0
    log.info("worker %d (user %s): %s", pid, user.user_id, user.last_exit)


def release_user(sup: Any, user_id: str | None) -> dict:
    """``smsctl release``: the user's worker drains, then releases; not taken again here for a TTL.

    ``sup`` is the :class:`smsd.supervisor.Supervisor` (its users, workers,
    ``_kill`` and ``run_admin``); without a worker the lease is released by an
    admin child.
    """
    if not user_id:
        raise ValueError("release needs a user_id")
    sup.users.setdefault(user_id, UserState(user_id)).next_start = time.monotonic() + sup.settings.lease.ttl
    sup.lease.forget(user_id)
    for w in sup.workers.values():
        if user_id in w.users():   # a group turn drains all its users
            w.recycle_reason = "released"
            sup._kill(w.pid, signal.SIGTERM)   # its in-flight calls finish and flush first
            log.info("user %s: lease given back once its worker drains", user_id)
            return {"released": [user_id], "user_id": user_id, "after_drain": True}
    return sup.run_admin("release", {"user_id": user_id})


@dataclass
class LeaseView:
    """What the supervisor knows of the leases between discoveries.

    ``host`` (this host's id, :func:`smsd.lease.host_id`) is read from
    ``state_dir`` on first use, after the supervisor has made the directory.
    """

    state_dir: Any = None
    _host: str = ""
    held: list[dict] = field(default_factory=list)   # this host's unexpired leases
    live_hosts: int = 1
    free_quota: int = 0                              # free leases still ours to take this round

    @property
    def host(self) -> str:
        if not self._host:
            self._host = host_id(self.state_dir)
        return self._host

    def ask(self, sup: Any) -> dict:
        """What a discovery of supervisor ``sup`` needs to read the leases (``discover``'s arguments)."""
        # Pre-forked workers stay up between turns: an idle one is a free slot.
        busy = sum(1 for w in sup.workers.values() if w.user_id is not None)
        free_slots = max(0, sup.settings.supervisor.max_workers - busy)
        return {"host": self.host, "free_slots": free_slots, "lease_users": self.owed(sup.users.values())}

    def turns(self, candidates: list, room: int) -> list:
        """The candidates (fairest first) that may get a worker now, free leases within the quota.

        The quota is used up by :meth:`started`, for the users that did get a turn:
        the scheduler may take fewer than offered (a group turn is bounded by its
        SMS), and a user offered but not started must not wait for the next
        discovery for a share it never used.
        """
        users, _ = lease_turns(candidates, self.host, room, self.free_quota)
        return users

    def started(self, users: Iterable[Any]) -> None:
        """``users`` got a turn: the free leases among them count against this round's quota."""
        free = sum(1 for u in users
                   if turn_kind(u.info.get("lease"), self.host, unflushed(u), u.handed_epoch) == "free")
        self.free_quota = max(0, self.free_quota - free)

    def owed(self, users: Iterable[UserState]) -> list[str]:
        """Users with unflushed answers here: the discovery reads their leases too."""
        return [u.user_id for u in users if unflushed(u)]

    def seen(self, users: dict[str, UserState], leases: dict | None, pending: dict) -> None:
        """Apply the leases a discovery read: each user's lease, live hosts, this host's share."""
        if not leases:
            return
        self.held = leases.get("held") or []
        self.live_hosts = int(leases.get("hosts") or 1)
        by_user = leases.get("by_user") or {}
        free = 0
        for user_id in leases.get("asked") or []:
            user = users.setdefault(user_id, UserState(user_id))
            user.info["lease"] = by_user.get(user_id)   # None: no lease yet, free
            if (pending.get(user_id) or unflushed(user)) and \
                    turn_kind(user.info["lease"], self.host, 0, None) == "free":
                free += 1
        self.free_quota = free_quota(free, self.live_hosts)

    def forget(self, user_id: str) -> None:
        """A lease given back (``smsctl release``): no longer shown as held."""
        self.held = [row for row in self.held if row.get("user_id") != user_id]
