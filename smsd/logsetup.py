"""Logging set-up shared by every smsd command (its own module so nothing imports cli)."""
from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO", log_file: str | None = None) -> logging.Handler:
    """Log to stderr (journald adds time and unit) or to a file (daemon mode)."""
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file)
        fmt = "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(process)d %(name)s %(levelname)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request line at INFO; the call log of smsd.llm is enough.
    for noisy in ("httpx", "httpx2", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler
