"""A one-shot run's patience: how long ``smsd once`` waits for MongoDB and the LLM.

``smsd run`` rides out outages; ``smsd once`` (and a new install's first
minutes) needs an answer.  :class:`Patience` is called on every pipeline tick:
it shows on the terminal what the run is waiting for, and once MongoDB or the
LLM has failed to answer for ``--wait`` seconds it stops the run (drain, then
abort: what is answered stays journaled) and keeps the reason for the exit
message.  The messages name the URI or base URL and model, never a password
or key.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, TextIO
from urllib.parse import urlsplit, urlunsplit

from .config import Settings


def mask_uri(uri: str) -> str:
    """``uri`` with any password replaced by ``***`` (MongoDB URIs may carry one)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparsable URI>"
    if parts.password is None:
        return uri
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


@dataclass
class Unavailable:
    """What did not answer in time, for the exit message."""

    what: str          # "MongoDB" | "LLM"
    message: str       # one line: names the place, the wait and the last error
    hint: str          # what to check


class Patience:
    """Stops a run whose MongoDB or LLM stays silent for ``wait`` seconds."""

    def __init__(self, settings: Settings, uri: str, wait: float, stop: Any, abort: Any,
                 stream: TextIO | None = None, then: Callable[[Any], None] | None = None) -> None:
        self.settings = settings
        self.uri = mask_uri(uri)
        self.wait = wait
        self.stop, self.abort = stop, abort
        self.stream = stream          # a terminal, or None: no waiting line
        self.then = then              # the next on_tick (the progress bar)
        self.gave_up: Unavailable | None = None
        self._shown = ""

    def __call__(self, pipeline: Any) -> None:
        if self.then is not None:
            self.then(pipeline)
        if self.gave_up is not None:
            return
        now = time.monotonic()
        waits = []
        if pipeline.mongo_down_since is not None:
            waits.append(("MongoDB", f"MongoDB at {self.uri} (database {self.settings.mongo.db})",
                          now - pipeline.mongo_down_since, pipeline.mongo_error))
        client = pipeline.extractor
        since = getattr(client, "outage_since", None)
        if since is not None:
            waits.append(("LLM", f"the LLM at {client.base_url} (model {client.model})",
                          now - since, getattr(client, "last_error", None)))
        self._give_up_after(waits)

    def mongo_down(self, since: float, error: str | None) -> None:
        """The same wait outside a pipeline (``smsd once`` taking its lease): MongoDB down since ``since``."""
        if self.gave_up is None:
            self._give_up_after([("MongoDB", f"MongoDB at {self.uri} (database {self.settings.mongo.db})",
                                  time.monotonic() - since, error)])

    def _give_up_after(self, waits: list) -> None:
        self._show(waits)
        for what, where, waited, error in waits:
            if waited >= self.wait:
                self.gave_up = Unavailable(what, f"{where} did not answer within {self.wait:g} s"
                                           + (f" ({error})" if error else ""), self._hint(what))
                self.stop.set()
                self.abort.set()
                return

    def _show(self, waits: list) -> None:
        if self.stream is None:
            return
        line = "; ".join(f"waiting for {where}: {waited:.0f}/{self.wait:g} s" for _, where, waited, _ in waits)
        if line != self._shown:
            self.stream.write(("\r\033[K" + line) if line else "\r\033[K")
            self.stream.flush()
            self._shown = line

    def _hint(self, what: str) -> str:
        if what == "MongoDB":
            return ("that MongoDB is running and reachable from this host, and mongo.uri "
                    "in the config file or $SMSD_MONGO_URI; `smsd doctor` checks both")
        return ("that the LLM server is running and reachable, and llm.base_url / $SMSD_LLM_BASE_URL "
                "(an OpenAI-compatible base URL usually ends in /v1); `smsd doctor` checks it")
