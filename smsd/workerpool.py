"""The supervisor's pool of pre-forked workers: who gets a turn, turn ends, retiring, killing.

:class:`WorkerPool` is a mixin of :class:`smsd.supervisor.Supervisor` (it reads
the supervisor's ``settings``, ``workers``, ``users``, ``figures`` and
``health``): up to ``max_workers`` long-lived workers (:mod:`smsd.worker`), each
handed one user's turn at a time over its command pipe; the turn ends they
report are applied from the main loop (:meth:`WorkerPool.handle_turns`), while
dead workers are still reaped in one place, :meth:`Supervisor.reap`.  It is
apart from the supervisor so that the arbiter reads as lifecycle, signals, loop
and reaping.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

from .children import WorkerProc, assign, rss, running_users, start_worker
from .scheduler import group_turns, next_turns
from .worker import EXIT_DONE

log = logging.getLogger("smsd.supervisor")

#: How often a worker's RSS is looked at.  The loop runs at every status line and turn
#: end (every few ms under load), and a look is two /proc reads; a worker's growth
#: within a second does not matter to a limit in MiB that recycles it between turns.
RSS_CHECK_S = 1.0


class WorkerPool:
    """Pre-forked workers, for :class:`smsd.supervisor.Supervisor` (a mixin)."""

    settings: Any
    workers: dict[int, WorkerProc]
    users: dict
    figures: Any
    health: Any
    pid: int
    mongo_uri: str | None
    applied_generation: int
    lease: Any   # smsd.lease_sched.LeaseView
    # Also used, defined by the supervisor: _close_inherited (fork hygiene), turn_ended (policy).

    def spawn_workers(self) -> None:
        """Give waiting users a turn: on an idle worker, or on a new one up to ``max_workers``."""
        running = set(running_users(self.workers.values()))
        idle = [w for w in self.workers.values()
                if w.user_id is None and not w.retire and w.recycle_reason is None and w.term_sent is None]
        excess = len(self.workers) - self.settings.supervisor.max_workers
        while excess > 0 and idle:   # max_workers went down (reload)
            self.retire(idle.pop())
            excess -= 1
        room = len(idle) + max(0, self.settings.supervisor.max_workers - len(self.workers))
        if room <= 0 or self.health.llm_misconfigured:
            return   # misconfigured: a new worker would only fail the same way; wait for a reload
        # Users whose lease another host holds are skipped; free leases up to this host's share.
        most = self.group_size()
        candidates = self.lease.turns(next_turns(self.users.values(), running, self.applied_generation),
                                      room * most)
        for turn in group_turns(candidates, room, most, self.settings.llm.batch_size,
                                self.settings.pipeline.trickle_group_calls):
            w = idle.pop() if idle else self.spawn_worker()
            if not assign(w, [u.user_id for u in turn]):
                continue   # it is dying; the reap replaces it and the users wait a loop turn
            self.lease.started(turn)
            self.figures.worker_started(w.pid, turn[0].user_id)
            for user in turn:
                user.last_served = time.monotonic()
            log.info("worker %d took user%s %s (turn %d of this worker)", w.pid, "s" if len(turn) > 1 else "",
                     ", ".join(u.user_id for u in turn), w.turns)

    def group_size(self) -> int:
        """How many small users one turn may serve (trickle batching; 1 = one user per turn)."""
        if self.settings.llm.mode != "online" or self.settings.llm.extractor == "rules":
            return 1   # batch jobs and the offline rules pay no prefix per call: nothing to fill
        return max(1, self.settings.pipeline.trickle_group_max_users)

    def spawn_worker(self) -> WorkerProc:
        """Fork an idle worker (it keeps its MongoDB and LLM clients across turns)."""
        w = start_worker(self.settings, self.pid, self.mongo_uri, self._close_inherited)
        self.workers[w.pid] = w
        log.info("worker %d started", w.pid)
        return w

    def handle_turns(self) -> None:
        """Apply the turn ends the workers reported (a worker stays up between turns)."""
        for w in list(self.workers.values()):
            self.turns_over(w)

    def turns_over(self, w: WorkerProc) -> None:
        while w.events:
            event = w.events.pop(0)
            user_id = event.get("turn_over")
            if user_id not in w.users():
                continue
            reason = self.turn_ended(w, int(event.get("code", EXIT_DONE)), event, user_id)
            if not w.end_turn(user_id):
                continue   # a group turn: its other users are still at work
            self.figures.worker_exited(w, reason)
            w.status = {}
            if w.retire:
                self.retire(w)

    def retire(self, w: WorkerProc) -> None:
        """End a worker once it is idle (SIGTERM now if it is; else after its turn)."""
        w.retire = True
        if w.user_id is None and w.term_sent is None:
            w.term_sent = time.monotonic()
            self._kill(w.pid, signal.SIGTERM)

    def check_workers(self) -> None:
        """Kill the silent (hung) and recycle the fat."""
        now = time.monotonic()
        sup = self.settings.supervisor
        for w in list(self.workers.values()):
            if now - w.last_seen > sup.worker_timeout:
                log.error("worker %d (user %s) silent for %.0f s: killing it", w.pid, w.user_id,
                          now - w.last_seen)
                w.recycle_reason = "hung"
                self._kill(w.pid, signal.SIGKILL)
                w.last_seen = now   # do not kill twice while waiting for the reap
                continue
            if w.recycle_reason is None and not w.retire and now - w.rss_checked >= RSS_CHECK_S:
                w.rss_checked = now
                used = rss(w.pid)
                if used > sup.worker_rss_limit_mb * 1024 * 1024:
                    # Between turns, like a reload: a SIGTERM now would drain a turn that may
                    # not have asked anything yet (a worker can be over the limit from its
                    # fork on), and its replacement would be cut the same way, for ever.
                    log.warning("worker %d (user %s) RSS %d MiB over the limit: recycling it after "
                                "its current turn", w.pid, w.user_id, used >> 20)
                    w.recycle_reason = "rss"
                    self.retire(w)

    def kill_all(self, sig: int, why: str) -> None:
        for w in self.workers.values():
            if sig == signal.SIGTERM and w.term_sent is not None:
                continue
            w.term_sent = time.monotonic()
            self._kill(w.pid, sig)

    @staticmethod
    def _kill(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

