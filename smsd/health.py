"""What the supervisor shows about its two outside parts: the LLM's setup and MongoDB's reach.

A worker whose LLM refuses the setup (bad key, unknown model, a request the
server always rejects: :class:`smsd.llm_errors.LlmConfigError`) exits with
:data:`smsd.worker.EXIT_MISCONFIGURED`; :class:`Health` then holds the
daemon in a visible ``llm: misconfigured`` state: no new workers (each would
buy nothing and fail the same way), an ERROR log line at most once a minute,
the reason in ``smsctl status`` and systemd's ``STATUS=``.  The control socket
keeps serving; ``smsctl reload`` / SIGHUP with a fixed configuration clears it.
It also keeps since when MongoDB has been unreachable, for the status.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("smsd.supervisor")

#: Seconds between ERROR lines while the LLM stays misconfigured.
NAG_INTERVAL = 60.0


class Health:
    """The LLM's configuration state and MongoDB's outage, as the supervisor last saw them."""

    def __init__(self) -> None:
        self.llm_error: str | None = None
        self.llm_hint: str | None = None
        self.llm_since: float | None = None
        self.last_nag = 0.0
        self.mongo_down_since: float | None = None

    @property
    def llm_misconfigured(self) -> bool:
        return self.llm_error is not None

    def misconfigured(self, error: str | None, hint: str | None, user_id: str) -> None:
        """A worker stopped on a configuration error: hold new workers until a reload."""
        first = self.llm_error is None
        self.llm_error = error or "the LLM refused the configuration (see the worker's log)"
        self.llm_hint = hint
        if first:
            self.llm_since = time.monotonic()
            self.last_nag = time.monotonic()
            log.error("llm: misconfigured (user %s): %s; fix: %s; then `smsctl reload` or SIGHUP. "
                      "No new workers until then.", user_id, self.llm_error, hint or "see above")

    def nag(self) -> None:
        """Repeat the ERROR line, at most once a minute, while nothing is fixed."""
        now = time.monotonic()
        if self.llm_error is not None and now - self.last_nag >= NAG_INTERVAL:
            self.last_nag = now
            log.error("llm: misconfigured for %.0f s: %s; fix: %s; then `smsctl reload` or SIGHUP",
                      now - (self.llm_since or now), self.llm_error, self.llm_hint or "see above")

    def reloaded(self) -> None:
        """New settings: let workers try the LLM again (they report back if it still refuses)."""
        if self.llm_error is not None:
            log.info("llm: configuration reloaded; workers try the LLM again")
        self.llm_error = self.llm_hint = self.llm_since = None

    def mongo_seen(self, ok: bool | None) -> None:
        """A discovery's verdict on MongoDB."""
        if ok is False and self.mongo_down_since is None:
            self.mongo_down_since = time.monotonic()
        elif ok:
            self.mongo_down_since = None

    def mongo_down_for(self) -> float | None:
        return None if self.mongo_down_since is None else time.monotonic() - self.mongo_down_since

    def llm_view(self) -> dict:
        """The ``llm`` keys of ``smsctl status`` this module fills."""
        if self.llm_error is None:
            return {"state": "ok"}
        return {"state": "misconfigured", "error": self.llm_error, "hint": self.llm_hint,
                "misconfigured_for_s": round(time.monotonic() - (self.llm_since or time.monotonic()), 1)}
