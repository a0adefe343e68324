"""The exit codes of a worker's user turn (also each ``turn_over`` line's ``code``).

Apart from :mod:`smsd.worker` (which re-exports them) so that the group turn's
modules, which the worker imports, can name them too.
"""
from __future__ import annotations

EXIT_DONE = 0            # the user has nothing pending (or the run was drained)
EXIT_ERROR = 1           # an unexpected exception: counted as a crash
EXIT_MORE = 10           # the turn is over and the user has more: queue again
EXIT_LOCKED = 75         # another process still holds the user's journal
EXIT_MISCONFIGURED = 78  # the LLM refuses the setup (key, model, request): no retry until a reload
EXIT_PARENT_GONE = 76    # the supervisor died
EXIT_LEASED = 73         # another host holds the user's lease
EXIT_STALE = 74          # the lease moved to another host; MongoDB refused our flush
