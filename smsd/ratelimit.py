"""One LLM rate limit for the whole host, shared by every worker process.

The provider's limits (requests/minute, tokens/minute) are per API key, not
per process, so all workers on a host must draw from one budget.  The budget
lives in a tiny state file guarded by ``fcntl.flock``; every process that opens
the same path shares it.

Algorithm: GCRA ("virtual scheduling").  The state holds, for each limit, the
*theoretical arrival time* (TAT) of the next request.  :meth:`RateLimiter.acquire`
takes the lock, computes when this request may go, moves the TAT on by the
request's cost, writes the state back and unlocks -- all in a few microseconds --
and only then sleeps, outside the lock, until its reserved slot.  Waiters thus
queue in reservation order without holding the lock while they sleep.

* requests/minute ``R`` with ``burst`` ``b``: the emission interval is
  ``60 / (R - b + 1)`` and the tolerance ``(b - 1)`` intervals.  Taking the
  burst out of the steady rate means that a burst followed by steady traffic
  still never exceeds ``R`` requests in any 60 s window.  With the default
  ``b = 1`` the interval is exactly ``60 / R``.
* tokens/minute ``K``: a call with ``T`` tokens occupies ``T / K`` minutes of
  the token schedule after it starts ("pay after"), so a call may start as
  soon as the previous calls' tokens have been paid off.  This conforms to a
  provider's token bucket of one minute's capacity.
* :meth:`RateLimiter.penalize`: after a 429 nobody on the host may send before
  ``now + seconds``; requests that had already reserved a slot re-check the
  shared state when they wake and queue again behind the penalty.

Times are ``CLOCK_MONOTONIC`` (``time.monotonic``), which is one clock for all
processes of a boot; the state records the kernel's boot id so a state file
that survives a reboot is discarded rather than trusted.  A missing, truncated
or corrupt state file (for instance after a ``kill -9`` mid-write) is simply
re-initialised: the worst outcome is one extra request.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("smsd.ratelimit")

__all__ = ["RateLimiter", "RateLimitAborted", "LimiterState"]

_MAGIC = b"SMRL"
_VERSION = 1
# magic, version, boot id (16 raw bytes), tat_req, tat_tok, blocked_until; then a CRC32.
_BODY = struct.Struct("<4sI16sddd")
_CRC = struct.Struct("<I")
_SIZE = _BODY.size + _CRC.size
#: A state further in the future than this is not plausible (a reboot with a
#: stale file, a clock mix-up): discard it instead of waiting for it.
_MAX_AHEAD_S = 6 * 3600.0


class RateLimitAborted(Exception):
    """:meth:`RateLimiter.acquire` was aborted by its ``stop`` event; do not send."""


@dataclass
class LimiterState:
    """The shared schedule: theoretical arrival times and the 429 penalty (monotonic seconds)."""

    tat_req: float = 0.0
    tat_tok: float = 0.0
    blocked_until: float = 0.0


def _boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            raw = f.read().strip().replace(b"-", b"")
        return bytes.fromhex(raw.decode("ascii"))[:16].ljust(16, b"\0")
    except (OSError, ValueError):
        return b"\0" * 16


_BOOT_ID = _boot_id()


def _encode(state: LimiterState) -> bytes:
    body = _BODY.pack(_MAGIC, _VERSION, _BOOT_ID, state.tat_req, state.tat_tok, state.blocked_until)
    return body + _CRC.pack(zlib.crc32(body))


def _decode(data: bytes, now: float) -> LimiterState | None:
    """The state in ``data``, or None if it is missing, torn, foreign or implausible."""
    if len(data) != _SIZE:
        return None
    body, (crc,) = data[: _BODY.size], _CRC.unpack(data[_BODY.size:])
    if zlib.crc32(body) != crc:
        return None
    magic, version, boot, tat_req, tat_tok, blocked = _BODY.unpack(body)
    if magic != _MAGIC or version != _VERSION or boot != _BOOT_ID:
        return None
    values = (tat_req, tat_tok, blocked)
    if any(v != v or v > now + _MAX_AHEAD_S for v in values):  # NaN or far future
        return None
    return LimiterState(tat_req, tat_tok, blocked)


class RateLimiter:
    """Host-wide GCRA limiter on requests/minute and tokens/minute.

    ``path`` is the shared state file (created 0600); ``None`` keeps the state
    in this process only.  ``requests_per_minute`` / ``tokens_per_minute`` of
    ``None`` (or <= 0) mean unlimited.  ``burst`` is how many requests may go
    back to back after an idle period; it is clamped to ``[1, R/2]`` because it
    is taken out of the steady rate (see the module docstring).

    Safe to use from many threads and many processes at once, and across
    ``fork`` (the file is opened per call, so a child never shares its
    parent's lock).
    """

    def __init__(
        self,
        path: Path | str | None,
        requests_per_minute: float | None,
        tokens_per_minute: float | None,
        *,
        burst: int = 1,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.requests_per_minute = requests_per_minute if requests_per_minute and requests_per_minute > 0 else None
        self.tokens_per_minute = tokens_per_minute if tokens_per_minute and tokens_per_minute > 0 else None
        rpm = self.requests_per_minute
        if rpm is not None:
            self.burst = max(1, min(int(burst), int(rpm // 2)))
            self._interval = 60.0 / (rpm - (self.burst - 1))
            self._tolerance = (self.burst - 1) * self._interval
        else:
            self.burst = max(1, int(burst))
            self._interval = 0.0
            self._tolerance = 0.0
        self._local = LimiterState()
        self._thread_lock = threading.Lock()
        self._slot = threading.local()

    # ------------------------------------------------------------------ public
    def acquire(self, tokens: int = 0, stop: threading.Event | None = None) -> float:
        """Wait for this host's next free slot for one request of ``tokens`` tokens.

        Reserves the slot atomically, then sleeps (outside the lock) until it.
        Returns the seconds waited.  Raises :class:`RateLimitAborted` if ``stop``
        is set while waiting -- the caller must then not send the request.
        """
        started = time.monotonic()
        slept = False
        while True:
            reserved_at = time.monotonic()
            send_at = self._update(lambda st, now: self._reserve(st, now, max(0, int(tokens))))
            self._slot.at = send_at
            if send_at <= time.monotonic():
                # No sleep on this pass: report only real waiting, not lock overhead.
                return time.monotonic() - started if slept else 0.0
            self._sleep_until(send_at, stop)
            slept = True
            # A 429 may have been seen by another process while we slept: if a
            # penalty was imposed after we reserved and still runs, queue again.
            state = self._read_only()
            if state.blocked_until > time.monotonic() and state.blocked_until > reserved_at:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("rate limit: penalty in force for %.2fs, re-queueing",
                              state.blocked_until - time.monotonic())
                continue
            return time.monotonic() - started

    def last_slot(self) -> float | None:
        """The send slot (``time.monotonic``) of the calling thread's last :meth:`acquire`.

        What the limiter promises is about these slots: they are spaced by the
        emission interval host-wide, and no request goes before its own.  The lab's
        LLM server records each request's slot (smsd's lab header) to check both.
        """
        return getattr(self._slot, "at", None)

    def penalize(self, seconds: float) -> None:
        """A 429 was seen: nobody on this host may send before ``now + seconds``."""
        seconds = max(0.0, float(seconds))

        def apply(state: LimiterState, now: float) -> float:
            until = now + min(seconds, _MAX_AHEAD_S / 2)
            state.blocked_until = max(state.blocked_until, until)
            # After the penalty traffic restarts at the steady pace, not in a herd.
            if self.requests_per_minute is not None:
                state.tat_req = max(state.tat_req, state.blocked_until)
            return state.blocked_until

        until = self._update(apply)
        log.info("rate limit: provider said slow down; no LLM request before +%.1fs", until - time.monotonic())

    def adjust_tokens(self, delta: int) -> None:
        """Correct the token schedule once a call's real token count is known.

        ``delta`` is real minus estimated tokens (may be negative: the schedule
        moves back, but never before now).
        """
        if self.tokens_per_minute is None or not delta:
            return
        shift = delta * 60.0 / self.tokens_per_minute

        def apply(state: LimiterState, now: float) -> None:
            state.tat_tok = max(now, state.tat_tok + shift) if shift < 0 else max(state.tat_tok, now) + shift

        self._update(apply)

    def snapshot(self) -> LimiterState:
        """The current shared state (for status output and tests)."""
        return self._read_only()

    # ---------------------------------------------------------------- internal
    def _reserve(self, state: LimiterState, now: float, tokens: int) -> float:
        send_at = max(now, state.blocked_until)
        if self.requests_per_minute is not None:
            send_at = max(send_at, state.tat_req - self._tolerance)
        if self.tokens_per_minute is not None:
            send_at = max(send_at, state.tat_tok)
        if self.requests_per_minute is not None:
            state.tat_req = max(state.tat_req, send_at) + self._interval
        if self.tokens_per_minute is not None:
            state.tat_tok = max(state.tat_tok, send_at) + tokens * 60.0 / self.tokens_per_minute
        return send_at

    @staticmethod
    def _sleep_until(deadline: float, stop: threading.Event | None) -> None:
        # Loop: Event.wait/sleep may return a hair early; the slot is a hard floor.
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if stop is not None:
                if stop.wait(remaining):
                    raise RateLimitAborted("rate-limit wait aborted")
            else:
                time.sleep(remaining)

    def _update(self, fn):
        """Run ``fn(state, now)`` under the host-wide lock and persist the state."""
        if self.path is None:
            with self._thread_lock:
                now = time.monotonic()
                result = fn(self._local, now)
                return result
        fd = self._open_locked()
        try:
            now = time.monotonic()
            state = self._load(fd, now)
            result = fn(state, now)
            data = _encode(state)
            # One small pwrite at offset 0: a torn write is caught by the CRC.
            os.pwrite(fd, data, 0)
            return result
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def _read_only(self) -> LimiterState:
        if self.path is None:
            with self._thread_lock:
                return LimiterState(self._local.tat_req, self._local.tat_tok, self._local.blocked_until)
        fd = self._open_locked()
        try:
            return self._load(fd, time.monotonic())
        finally:
            os.close(fd)

    def _load(self, fd: int, now: float) -> LimiterState:
        try:
            data = os.pread(fd, _SIZE + 1, 0)
        except OSError as exc:
            log.warning("rate limit: cannot read %s (%s); starting afresh", self.path, exc)
            data = b""
        state = _decode(data, now)
        if state is None:
            if data:
                log.warning("rate limit: state file %s unreadable or stale; starting afresh", self.path)
            state = LimiterState()
            # Drop any trailing garbage so the next reader sees a clean record.
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
        return state

    def _open_locked(self) -> int:
        """Open the state file and take the exclusive flock; returns the fd.

        Opened per call so that threads (separate open file descriptions
        conflict under flock) and forked children (which must not share the
        parent's description) each lock for real.  If the file was replaced
        or unlinked while we waited for the lock, lock the new one instead.
        """
        assert self.path is not None
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except FileNotFoundError:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                continue
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise OSError(exc.errno, f"rate-limit state {self.path} is a symlink; refusing") from exc
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                st = os.fstat(fd)
                try:
                    cur = os.stat(self.path)
                except FileNotFoundError:
                    cur = None
                if cur is not None and (cur.st_ino, cur.st_dev) == (st.st_ino, st.st_dev):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # someone replaced the file: retry on the new one
        raise OSError(f"rate-limit state {self.path} keeps changing under us")
