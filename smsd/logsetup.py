"""Logging set-up shared by every smsd command (its own module so nothing imports cli).

Two formats (``supervisor.log_format``):

* ``text``: ``[time] pid logger LEVEL message``.  Under journald (stderr is
  the stream ``$JOURNAL_STREAM`` names) the time is left out: the journal
  stamps every line itself.
* ``json``: one JSON object per line with ``ts`` (UTC, ISO 8601), ``level``,
  ``logger``, ``pid``, ``user_id`` and ``call_id`` (null where unknown),
  ``event`` (the message) and the figures of the event: whatever the log
  call passed as ``extra=``.  A worker binds its user once
  (:func:`bind_context`), so every line it writes carries the user id.

Neither format adds anything a log call did not say: the rule that SMS text,
API keys and LLM answers are never logged is the callers'.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_context: dict[str, object] = {}


def bind_context(**fields: object) -> None:
    """Fields added to every JSON line of this process from now on (a worker's ``user_id``)."""
    _context.update(fields)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, pid, user_id, call_id, event, figures."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "user_id": _context.get("user_id"),
            "call_id": None,
            "event": record.getMessage(),
        }
        for key, value in _context.items():
            out.setdefault(key, value)
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def under_journald(stream: object = None) -> bool:
    """Whether ``stream`` (default stderr) is the journal's stream (``$JOURNAL_STREAM`` is ``dev:ino``)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat((stream or sys.stderr).fileno())  # type: ignore[attr-defined]
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def make_formatter(log_format: str = "text", *, timestamps: bool = True) -> logging.Formatter:
    """The formatter of ``log_format`` (``text`` without its own time when ``timestamps`` is False)."""
    if log_format == "json":
        return JsonFormatter()
    fmt = "%(process)d %(name)s %(levelname)s %(message)s"
    return logging.Formatter(("%(asctime)s " if timestamps else "") + fmt)


def setup_logging(level: str = "INFO", log_file: str | None = None,
                  log_format: str = "text") -> logging.Handler:
    """Log to stderr (journald adds time and unit) or to a file (daemon mode)."""
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(make_formatter(log_format))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(make_formatter(log_format, timestamps=not under_journald(sys.stderr)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request line at INFO; the call log of smsd.llm is enough.
    for noisy in ("httpx", "httpx2", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler
