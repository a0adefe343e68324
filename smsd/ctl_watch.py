"""``smsctl status --watch [SECONDS]``: the status table, refreshed, with SMS/s and an ETA.

The rate is the growth of the daemon's ``totals.processed_sms`` over the
samples of the last minute (this smsctl's own samples: the daemon keeps no
history); the ETA is the pending SMS over that rate.  On a terminal each
refresh clears the screen and redraws in place; otherwise (a pipe, a log)
the blocks follow each other.  Ctrl-C ends it with exit 0.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Mapping, TextIO

#: Samples older than this are not used for the rate.
RATE_WINDOW_S = 60.0
CLEAR_HOME = "\x1b[H\x1b[2J"


class Rate:
    """SMS/s over the last minute of ``(time, processed)`` samples, and the ETA of what is pending."""

    def __init__(self, window: float = RATE_WINDOW_S) -> None:
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, t: float, processed: int) -> None:
        """Record a sample (a drop in ``processed``, e.g. a daemon restart, starts afresh)."""
        if self.samples and processed < self.samples[-1][1]:
            self.samples.clear()
        self.samples.append((t, processed))
        while len(self.samples) > 2 and t - self.samples[0][0] > self.window:
            self.samples.popleft()

    def per_second(self) -> float | None:
        """SMS/s, or None until two samples exist."""
        if len(self.samples) < 2:
            return None
        (t0, p0), (t1, p1) = self.samples[0], self.samples[-1]
        return (p1 - p0) / (t1 - t0) if t1 > t0 else None

    def eta_s(self, pending: int) -> float | None:
        """Seconds until ``pending`` SMS are done at the current rate (None: no progress to go by)."""
        rate = self.per_second()
        if not pending:
            return 0.0
        if not rate or rate <= 0:
            return None
        return pending / rate


def progress_line(reply: Mapping[str, Any], rate: Rate, duration: Callable[[Any], str]) -> str:
    """``rate 12.5 SMS/s (last 60 s)  pending 500  ETA 40s``."""
    totals = reply.get("totals") or {}
    pending = int(totals.get("pending_sms") or 0)
    per_s = rate.per_second()
    eta = rate.eta_s(pending)
    rate_s = "-" if per_s is None else f"{per_s:.1f}"
    eta_s = "-" if eta is None else duration(eta)
    line = (f"rate {rate_s} SMS/s (last {int(rate.window)} s)  processed {totals.get('processed_sms', '-')}"
            f"  pending {pending}  ETA {eta_s}")
    if reply.get("metrics_url"):
        line += f"  metrics {reply['metrics_url']}"
    return line


def watch(fetch: Callable[[], Mapping[str, Any]], render: Callable[[Mapping[str, Any]], str],
          duration: Callable[[Any], str], interval: float, out: TextIO,
          clock: Callable[[], float] = time.monotonic) -> int:
    """Fetch and draw every ``interval`` seconds until Ctrl-C (exit 0).

    ``fetch`` raises to report the daemon unreachable; the watch goes on and
    shows the error, so a restart of the daemon is watched through.
    """
    rate = Rate()
    tty = out.isatty()
    try:
        while True:
            started = clock()
            try:
                reply = fetch()
                rate.add(started, int((reply.get("totals") or {}).get("processed_sms") or 0))
                block = render(reply) + "\n" + progress_line(reply, rate, duration) + "\n"
            except Exception as exc:  # noqa: BLE001 - show why, keep watching
                block = f"smsd does not answer: {exc}\n"
            stamp = time.strftime("%H:%M:%S")
            header = f"every {interval:g} s, {stamp} (Ctrl-C to stop)\n"
            out.write((CLEAR_HOME if tty else "") + header + block + ("" if tty else "\n"))
            out.flush()
            time.sleep(max(0.0, interval - (clock() - started)))
    except KeyboardInterrupt:
        if tty:
            out.write("\n")
        return 0
