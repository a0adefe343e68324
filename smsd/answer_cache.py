"""Pay once per text: answers shared across users in MongoDB, keyed by what the model saw.

Identical SMS texts are common across users (promotions, bank notices, OTP
templates).  An answer is cached under a hash of (normalised text, sender,
prompt version, model): the same words from the same sender, asked with the
same system prompt and schema of the same model, get the same answer.  Nothing
else is in the key, so a cached answer is never reused across prompt versions
or models.

* Read: when the pipeline claims a page, it looks the page's SMS up (one
  ``find``, :meth:`CacheGate.prefetch`); a hit is journaled like any answer
  (model ``cache``, 0 tokens) when its call would be sent, and then flushed.
  An SMS not looked up with its page (one released by a twin's flush, one
  claimed while MongoDB was away) is looked up before its call.
* Written only from flushed answers (:func:`remember`, called by the flush
  after the SMS are stored), never from an unflushed or a cached one.
* Two identical texts asked at the same moment (two workers, or before the
  first answer is flushed) are both paid: at most one paid ask per text for
  each call in flight on the host (``max_workers`` x ``llm.concurrency``)
  until the first flush fills the entry.  Looking up per page rather than per
  call widens "the same moment" across workers from a call to a page's calls
  (within one pipeline nothing changes: its own twins are held, see below).  :func:`remember` counts the ones
  that found the entry already written by another call (``cache_races``).

The cache holds no user id and no SMS text: the hash, the answer, the model,
the prompt version, the call that paid for it and when.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from datetime import datetime, timezone
from typing import Any, Iterable

from bson.decimal128 import Decimal128
from pymongo import WriteConcern

from .ledger import FREE_MODELS
from .model import Sms, SmsResult, Transaction
from .store_errors import StoreUnavailable

log = logging.getLogger("smsd.answer_cache")

COLLECTION = "smsd_answer_cache"
#: The cache's write concern: a cache entry need not survive a crash of MongoDB.
CACHE_WRITES = WriteConcern(w=1, j=False)
_SPACE = re.compile(r"\s+")


def prompt_version(system_prompt: str, response_format: dict) -> str:
    """A short hash of what the model is told besides the SMS: system prompt and schema."""
    blob = system_prompt + "\x1e" + json.dumps(response_format, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def normalise(text: str) -> str:
    """Whitespace runs as one space, no leading or trailing space (case and words kept)."""
    return _SPACE.sub(" ", text).strip()


def cache_key(text: str, sender: str | None, version: str, model: str) -> str:
    """The cache ``_id`` of an SMS: sha256 of normalised text, sender, prompt version, model."""
    blob = "\x1f".join((normalise(text), sender or "", version, model))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _to_doc(result: SmsResult) -> list[dict]:
    out = []
    for t in result.transactions:
        d = t.to_json()
        d["amount"] = Decimal128(t.amount)
        if t.balance is not None:
            d["balance"] = Decimal128(t.balance)
        out.append(d)
    return out


def _from_doc(key: str, doc: dict) -> SmsResult:
    txns = []
    for d in doc.get("transactions") or []:
        d = dict(d)
        for name in ("amount", "balance"):
            if isinstance(d.get(name), Decimal128):
                d[name] = str(d[name].to_decimal())
        txns.append(Transaction.from_json(d))
    return SmsResult(key=key, kind=doc["kind"], transactions=tuple(txns))


def lookup(collection: Any, wanted: dict[str, str]) -> dict[str, SmsResult]:
    """``{sms_key: result}`` of the SMS whose cache key (``wanted[sms_key]``) has an entry."""
    if not wanted:
        return {}
    found = {doc["_id"]: doc for doc in collection.find({"_id": {"$in": sorted(set(wanted.values()))}})}
    return results(wanted, found)


def results(wanted: dict[str, str], found: dict[str, dict | None]) -> dict[str, SmsResult]:
    """``{sms_key: result}`` from the cache entries ``found`` (by cache key) of ``wanted``."""
    out: dict[str, SmsResult] = {}
    for key, ckey in wanted.items():
        doc = found.get(ckey)
        if doc is None:
            continue
        try:
            out[key] = _from_doc(key, doc)
        except (KeyError, TypeError, ValueError, ArithmeticError):
            log.warning("answer cache entry %s is unreadable; asking the LLM", ckey[:12])
    return out


def remember(collection: Any, entries: Iterable[tuple[str, SmsResult, str, str, str]],
             bulk: Any) -> int:
    """Write flushed answers: ``(cache key, result, model, prompt version, call id)``.

    Inserts: the first answer of a text stays (a second insert of its key is a
    duplicate and writes nothing), a replay writes nothing.  An insert, not an
    upsert, because an entry never changes once written, and SecantusDB spends
    about five times the server time on an upsert (measured: 200 entries, 70 ms
    upserted, 13 ms inserted).  Returns how many entries another call had
    written first (paid twice: a race).  ``bulk(ops) -> {op index: created}``
    writes them (:meth:`smsd.store.Store.bulk_upsert`; a group turn's store
    writes its members' together).
    """
    from pymongo import InsertOne
    entries = list({e[0]: e for e in entries}.values())
    if not entries:
        return 0
    now = datetime.now(timezone.utc)
    ops = [InsertOne({"_id": ckey, "kind": result.kind, "transactions": _to_doc(result), "model": model,
                      "prompt_version": version, "call_id": call_id, "created_at": now})
           for ckey, result, model, version, call_id in entries]
    inserted = set(bulk(ops))
    matched = [entries[i] for i in range(len(entries)) if i not in inserted]
    if not matched:
        return 0
    # A matched entry written by this very call is a replay of our own flush, not a race.
    writer = {d["_id"]: d.get("call_id") for d in
              collection.find({"_id": {"$in": [e[0] for e in matched]}}, {"call_id": 1})}
    return sum(1 for e in matched if writer.get(e[0]) != e[4])


class CacheGate:
    """One pipeline's use of the cache: look up before a call, fill after a flush, and
    hold back an SMS whose text is being paid for by a call of this worker (so that a
    worker pays for a text at most once at a time)."""

    def __init__(self, store: Any, journal: Any, model: str, version: str) -> None:
        self.store = store
        self.journal = journal
        self.model = model
        self.version = version
        self.paying: set[str] = set()       # cache keys whose paid answer is not in the cache yet
        self.held: list[Sms] = []           # SMS waiting for a twin's answer to reach the cache
        self.known: dict[str, SmsResult | None] = {}   # sms key -> its page's lookup (None: a miss)

    @classmethod
    def for_pipeline(cls, settings: Any, extractor: Any, store: Any, journal: Any) -> "CacheGate | None":
        """A gate when ``llm.answer_cache`` is on and the extractor is the LLM client, else None."""
        sent = getattr(extractor, "response_format_sent", None)
        if not settings.llm.answer_cache or sent is None:
            return None
        from .llm import SYSTEM_PROMPT
        return cls(store, journal, extractor.model, prompt_version(SYSTEM_PROMPT, sent))

    def key(self, m: Sms) -> str:
        """The cache key of one SMS."""
        return cache_key(m.text, m.sender, self.version, self.model)

    def hashes(self, batch: list[Sms]) -> list[str]:
        """The cache keys of a call's SMS, kept with the call in the journal for the flush."""
        return [self.key(m) for m in batch]

    def prefetch(self, page: list[Sms]) -> None:
        """Look a claimed page up at once (one ``find`` per page instead of one per call)."""
        wanted = {m.key: self.key(m) for m in page if m.key not in self.known}
        try:
            with self.store.errors("answer cache lookup"):
                hits = lookup(self.store.collection(COLLECTION), wanted)
        except StoreUnavailable:
            return                # looked up again before their calls
        self.known.update({key: hits.get(key) for key in wanted})

    def split(self, batch: list[Sms]) -> tuple[list[tuple[Any, SmsResult]], list[Sms]]:
        """(cached answers as (raw_id, result), SMS to ask); twins of a text being paid are held."""
        wanted = {m.key: self.key(m) for m in batch}
        # Each page lookup serves once: a held twin comes back after its text's fill and
        # is looked up again, and then finds the entry.
        hits = {m.key: self.known.pop(m.key) for m in batch if m.key in self.known}
        unknown = {k: v for k, v in wanted.items() if k not in hits}
        try:
            with self.store.errors("answer cache lookup"):
                hits.update(lookup(self.store.collection(COLLECTION), unknown))
        except StoreUnavailable:
            pass                  # MongoDB away: ask the LLM, as without a cache
        hits = {k: v for k, v in hits.items() if v is not None}
        found, ask = [], []
        for m in batch:
            if m.key in hits:
                found.append((m.raw_id, hits[m.key]))
            elif wanted[m.key] in self.paying:
                self.held.append(m)
            else:
                self.paying.add(wanted[m.key])
                ask.append(m)
        return found, ask

    def release(self, sms: list[Sms], texts: set[str] | None = None) -> list[Sms]:
        """These SMS (or cache keys) no longer pay for their text; returns the twins to queue again."""
        texts = set(texts or ()) | {self.key(m) for m in sms}
        self.paying -= texts
        back = [m for m in self.held if self.key(m) in texts]
        if back:
            self.held = [m for m in self.held if m not in back]
        return back

    def fill(self, answers: list[Any]) -> tuple[int, list[Sms]]:
        """Flushed paid answers into the cache; returns (races counted, twins to queue again)."""
        paid = [a for a in answers if a.model not in FREE_MODELS]
        if not paid:
            return 0, []
        hashes = self.journal.text_hashes([a.call_id for a in paid])
        entries = [(hashes[r.key], r, a.model, self.version, a.call_id)
                   for a in paid for _, r in a.items if r.key in hashes]
        # Acknowledged, not journaled (j=false): an entry lost to a MongoDB crash costs
        # one paid call for its text later, and nothing else reads it as a fact; the
        # flush's own writes keep the store's journaled write concern.
        with self.store.errors("answer cache write"):
            coll = self.store.collection(COLLECTION).with_options(write_concern=CACHE_WRITES)
            races = remember(coll, entries, bulk=lambda ops: self.store.bulk_upsert(
                COLLECTION, ops, what="answer cache write", write_concern=CACHE_WRITES))
        if races:
            self.journal.note_cache_races(paid[0].model, races)
            log.info("%d SMS were paid while another call paid for the same text", races)
        return races, self.release([], {e[0] for e in entries})
