"""The drill's kills: each kind of SIGKILL, the orphan check, and their schedule.

:class:`KillsMixin` is mixed into :class:`smsd.lab.drill.Drill`: it kills a
worker, the supervisor (then starts a new ``smsd run``), the database
(restarted on the same port and storage) or the supervisor while the database
is down, checks that no child of a killed supervisor outlives it, and plans
and paces the kills (time- or progress-triggered, each waiting for the last
one's recovery).  Apart from the run loop because choosing and making kills is
a job of its own; it uses the drill's state (``o``, ``rng``, ``sup``,
``mongo``, ``monitor``, ...) and its supervisor methods.
"""
from __future__ import annotations

import os
import signal
import time

from .drill_common import ORPHAN_GRACE_S, KillEvent


def _alive(pid: int, create_time: float | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, if given, started at ``create_time``."""
    import psutil
    try:
        p = psutil.Process(pid)
        if create_time is not None and abs(p.create_time() - create_time) > 0.05:
            return False   # the pid was reused
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class KillsMixin:
    """The kills of :class:`smsd.lab.drill.Drill` (see the module docstring)."""

    def _children(self, pid: int) -> list[dict]:
        import psutil
        try:
            kids = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            return []
        out = []
        for k in kids:
            try:
                out.append({"pid": k.pid, "create_time": k.create_time()})
            except psutil.Error:
                pass
        return out

    def kill_worker(self, n: int) -> KillEvent | None:
        """SIGKILL a random worker of the current supervisor; ``None`` if there is none."""
        import psutil
        st = self.status()
        if not st or self.sup is None:
            return None
        candidates = [w for w in st.get("workers", [])
                      if not str(w.get("state", "")).startswith(("stopping", "exiting"))]
        self.rng.shuffle(candidates)
        for w in candidates:
            try:
                proc = psutil.Process(int(w["pid"]))
                if proc.ppid() != self.sup.pid:
                    continue    # never kill a process that is not this supervisor's child
            except psutil.Error:
                continue
            ev = KillEvent(n=n, kind="worker", at_s=self.elapsed(), wall=time.time(),
                           user_id=w["user_id"], pid=proc.pid)
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            ev.resumed_at_s = ev.at_s
            self.say(f"kill {n}: worker pid {proc.pid} (user {w['user_id']})")
            return ev
        return None

    def _kill_supervisor_now(self, ev: KillEvent) -> None:
        assert self.sup is not None
        st = self.status(timeout=1.0)
        ev.workers = sorted(int(w["pid"]) for w in (st or {}).get("workers", []))
        children = self._children(self.sup.pid)
        ev.pid = self.sup.pid
        ev.wall = time.time()
        try:
            os.kill(self.sup.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.sup.wait()
        self.orphan_checks.append({"due": time.monotonic() + ORPHAN_GRACE_S, "event": ev.n,
                                   "children": children, "workers": set(ev.workers)})

    def kill_supervisor(self, n: int) -> KillEvent | None:
        """SIGKILL the supervisor, then start a new ``smsd run``; ``None`` if none answers."""
        if self.sup is None or self.status(timeout=1.0) is None:
            return None
        ev = KillEvent(n=n, kind="supervisor", at_s=self.elapsed(), wall=time.time())
        self._kill_supervisor_now(ev)
        time.sleep(self.rng.uniform(0.0, 0.5))
        ev.new_supervisor_pid = self.start_supervisor()
        ev.resumed_at_s = self.elapsed()
        self.say(f"kill {n}: supervisor pid {ev.pid} ({len(ev.workers)} workers) "
                 f"-> new smsd run pid {ev.new_supervisor_pid}")
        self.wait_ready()
        return ev

    def kill_database(self, n: int) -> KillEvent | None:
        """SIGKILL the database server; restart it on the same port and storage soon after."""
        assert self.mongo is not None
        ev = KillEvent(n=n, kind="database", at_s=self.elapsed(), wall=time.time(),
                       pid=self.mongo.pid)
        self.mongo.kill()
        down = self.rng.uniform(0.5, 2.0)
        self.say(f"kill {n}: database pid {ev.pid}, down for {down:.1f} s")
        time.sleep(down)
        self.mongo.start()
        ev.db_down_s = round(self.elapsed() - ev.at_s, 2)
        ev.resumed_at_s = self.elapsed()
        return ev

    def kill_supervisor_db_down(self, n: int) -> KillEvent | None:
        """SIGKILL the database, then the supervisor while it is down; restart both."""
        assert self.mongo is not None
        if self.sup is None or self.status(timeout=1.0) is None:
            return None
        ev = KillEvent(n=n, kind="supervisor-db-down", at_s=self.elapsed(), wall=time.time())
        db_pid = self.mongo.pid
        self.mongo.kill()
        time.sleep(self.rng.uniform(0.2, 1.0))
        self._kill_supervisor_now(ev)
        ev.new_supervisor_pid = self.start_supervisor()
        self.say(f"kill {n}: database pid {db_pid}, then supervisor pid {ev.pid} "
                 f"({len(ev.workers)} workers) while it is down -> new smsd run pid "
                 f"{ev.new_supervisor_pid}")
        self.wait_ready()
        time.sleep(self.rng.uniform(0.5, 2.0))
        self.mongo.start()
        ev.db_down_s = round(self.elapsed() - ev.at_s, 2)
        ev.resumed_at_s = self.elapsed()
        return ev

    def check_orphans(self, final: bool = False) -> None:
        """Children of killed supervisors still alive 5 s later are orphans (``final``: wait)."""
        now = time.monotonic()
        for check in list(self.orphan_checks):
            if not final and now < check["due"]:
                continue
            if final and now < check["due"]:
                time.sleep(max(0.0, check["due"] - now))
            self.orphan_checks.remove(check)
            for child in check["children"]:
                if _alive(child["pid"], child["create_time"]):
                    kind = "worker" if child["pid"] in check["workers"] else "child"
                    self.orphans.append({"kill": check["event"], "pid": child["pid"], "kind": kind})
                    self.say(f"!! orphan: {kind} pid {child['pid']} of the supervisor killed by "
                             f"kill {check['event']} still alive {ORPHAN_GRACE_S:.0f} s later")

    # ------------------------------------------------------------------- plan
    def plan(self) -> list[str]:
        """The kinds of the kills, in order: each chosen kind at least once if there is room."""
        o = self.o
        kinds = list(o.kinds)
        plan = kinds[:o.kills] if o.kills >= len(kinds) else self.rng.sample(kinds, o.kills)
        plan += [self.rng.choice(kinds) for _ in range(o.kills - len(plan))]
        self.rng.shuffle(plan)
        return plan

    def run_kills(self) -> None:
        """Kill on schedule (time- or progress-triggered) until the plan is done or the work is."""
        o = self.o
        plan = self.plan()
        n = len(plan)
        start = self.elapsed()
        window = max(1.0, 0.6 * o.duration - start)
        times = [start + window * (i + self.rng.uniform(0.2, 0.8)) / max(1, n) for i in range(n)]
        fracs = [0.9 * (i + 1) / (n + 1) for i in range(n)]
        spacing = window / max(1, n)
        min_gap = max(0.5, min(1.5, spacing / 4))
        # The next kill waits for the last one's recovery (the processed count
        # rose again) unless that takes longer than this: then it strikes anyway.
        gate = max(min_gap, 2.0 * spacing)
        total = len(self.expected)
        last_resume = self.elapsed()
        last: KillEvent | None = None
        i = 0
        waiting_since: float | None = None
        kill_fn = {"worker": self.kill_worker, "supervisor": self.kill_supervisor,
                   "database": self.kill_database, "supervisor-db-down": self.kill_supervisor_db_down}
        while i < n:
            self.check_supervisor()
            self.check_orphans()
            now = self.elapsed()
            processed, pending = self.monitor.snapshot() if self.monitor else (0, None)
            finished = pending == 0 and processed > 0
            if finished or now > o.duration + o.grace:
                why = "the work was finished" if finished else "past --duration + --grace"
                for kind in plan[i:]:
                    self.skipped.append({"kind": kind, "why": why})
                self.say(f"kills {i + 1}..{n} skipped: {why}")
                return
            due = now >= times[i] or processed >= fracs[i] * total
            recovered = last is None or self.monitor is None or self.monitor.recovered(last)
            if not due or now - last_resume < min_gap or (not recovered and now - last_resume < gate):
                time.sleep(0.1)
                continue
            ev = kill_fn[plan[i]](i + 1)
            if ev is None:
                waiting_since = waiting_since or now
                if now - waiting_since > 10.0:
                    self.skipped.append({"kind": plan[i], "why": "no target (no worker/supervisor up)"})
                    self.say(f"kill {i + 1} ({plan[i]}): no target for 10 s: skipped")
                    i += 1
                    waiting_since = None
                time.sleep(0.1)
                continue
            waiting_since = None
            last = ev
            self.events.append(ev)
            last_resume = ev.resumed_at_s if ev.resumed_at_s is not None else self.elapsed()
            i += 1
