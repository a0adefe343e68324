"""Who gets a worker next: the supervisor's per-user scheduling state and rules.

:class:`UserState` is what the supervisor knows and decides about one user;
the functions here are the decisions made on it: whether a user has work,
the fair order in which waiting users get a worker (paid-for journal rows
first, then whoever waited longest), the restart back-off and crash-loop
bookkeeping after a worker dies, clearing it on ``smsctl resume``, and the
paused users kept across restarts (``paused.json``).  They are apart from
:mod:`smsd.supervisor` because they are policy on plain data: no processes,
signals or pipes, so they read (and change) without the process lifecycle
around them.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .config import SupervisorSettings

log = logging.getLogger("smsd.supervisor")


@dataclass
class UserState:
    """What the supervisor knows and decides about one user."""

    user_id: str
    paused: bool = False
    failed: bool = False
    crashes: deque = field(default_factory=deque)
    consecutive_crashes: int = 0
    restarts: int = 0
    next_start: float = 0.0
    last_served: float = 0.0
    done_generation: int = -1
    info: dict = field(default_factory=dict)     # counts from the last discovery
    last_exit: str | None = None
    handed_epoch: int | None = None              # the other host's lease epoch we handed answers to


def unflushed(user: UserState) -> int:
    """The user's journal rows not yet flushed, as last reported."""
    return int((user.info.get("journal") or {}).get("unflushed") or 0)


def has_work(user: UserState, applied_generation: int) -> bool:
    """Pending SMS or unflushed rows, unless the user finished after the last applied look began."""
    if user.done_generation >= applied_generation:
        return False   # finished after the last applied look began: wait for a fresh one
    return bool(user.info.get("pending_sms")) or unflushed(user) > 0


def next_turns(users: Iterable[UserState], running: set[str], applied_generation: int) -> list[UserState]:
    """The users that may get a worker now (not running, paused, failed or backing off), fairest first."""
    now = time.monotonic()
    candidates = [u for u in users
                  if u.user_id not in running and not u.paused and not u.failed
                  and u.next_start <= now and has_work(u, applied_generation)]
    # Unflushed journal rows first (they are paid for), then whoever waited longest:
    # a user with 50,000 SMS gets one turn of worker_max_sms, then goes to the back.
    candidates.sort(key=lambda u: (not unflushed(u), u.last_served))
    return candidates


class _Calls:
    """The LLM calls a group's SMS fill, packed as the combiner packs them (in order, next fit)."""

    def __init__(self, size: int, most: int, first: int) -> None:
        self.size, self.most, self.calls, self.load = size, max(1, most), 1, first

    def add(self, n: int) -> bool:
        """Take ``n`` more SMS if they fit the last call or a new one within ``most``."""
        if self.load + n <= self.size:
            self.load += n
        elif self.calls < self.most:
            self.calls, self.load = self.calls + 1, n
        else:
            return False
        return True


def group_turns(candidates: Iterable[UserState], room: int, most: int, call_sms: int,
                calls: int = 1) -> list[list[UserState]]:
    """The next turns (fairest first, at most ``room``): one user each, or a group of small users.

    Trickle batching (:mod:`smsd.combiner`): users with fewer pending SMS than one
    call holds (``call_sms``) share a turn, up to ``most`` users and as many as fill
    ``calls`` LLM calls of ``call_sms`` SMS, packed in order as the combiner packs
    them (a 4-SMS user does not fit a call holding 24), so that their SMS fill
    LLM calls together; a bigger group also spreads a worker turn's fixed cost
    over more users.  A user with a
    full call's worth of SMS keeps a turn of its own, as before; so does a user
    whose last turn crashed, so that a user whose turn kills its worker crashes
    alone and never drags a group's other users into its crash loop.
    """
    turns: list[list[UserState]] = []
    packs: list[_Calls | None] = []   # None: a turn of its own, nobody joins
    for user in candidates:
        n = max(1, int(user.info.get("pending_sms") or 0))
        small = most > 1 and n < call_sms and not user.consecutive_crashes
        if small:
            fit = next((i for i, t in enumerate(turns) if packs[i] is not None and len(t) < most
                        and packs[i].add(n)), None)
            if fit is not None:
                turns[fit].append(user)
                continue
        if len(turns) >= room:
            continue   # a small user may still fit an open group further down
        turns.append([user])
        packs.append(_Calls(call_sms, calls, n) if small else None)
    return turns


def record_crash(user: UserState, sup: SupervisorSettings, pid: int, why: str) -> None:
    """A worker died: back off its restart, or mark the user failed if it crash-loops."""
    now = time.monotonic()
    user.last_exit = why
    user.restarts += 1
    user.consecutive_crashes += 1
    user.crashes.append(now)
    while user.crashes and now - user.crashes[0] > sup.crash_loop_window:
        user.crashes.popleft()
    if len(user.crashes) >= sup.crash_loop_count:
        user.failed = True
        log.error("user %s: worker crashed %d times in %.0f s (last: %s): marked failed; "
                  "`smsctl resume --user-id %s` to try again", user.user_id, len(user.crashes),
                  sup.crash_loop_window, why, user.user_id)
        return
    delay = min(sup.restart_backoff_max, sup.restart_backoff * 2 ** (user.consecutive_crashes - 1))
    user.next_start = now + delay
    user.last_served = 0.0   # restart the dead first, not after every other user's turn
    log.warning("worker %d (user %s) died (%s); restarting in %.1f s", pid, user.user_id, why, delay)


def clear_failures(user: UserState) -> None:
    """``smsctl resume``: unpause, forget crashes and back-off, wait for no fresh look."""
    user.paused = user.failed = False
    user.crashes.clear()
    user.consecutive_crashes = 0
    user.next_start = 0.0
    user.done_generation = -1


def load_paused(path: Path) -> list[str]:
    """The users paused when the supervisor last saved them (none if the file is missing or bad)."""
    try:
        paused = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [str(user_id) for user_id in paused] if isinstance(paused, list) else []


def save_paused(path: Path, users: Iterable[UserState]) -> None:
    """Write the paused users' ids, atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(sorted(u.user_id for u in users if u.paused)))
    os.replace(tmp, path)
