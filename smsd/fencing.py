"""Writes that MongoDB itself refuses when a newer lease epoch owns the user.

A host paused past its lease (SIGSTOP, a VM stall, a cut link) passes any
client-side "do I still hold the lease?" check and writes afterwards, so the
check that counts is in the filters of the writes themselves:

* Every document smsd writes for a user carries the epoch that wrote it,
  ``smsd_epoch`` (raw SMS, transactions, checkpoints), and every write of the
  flush filters on ``smsd_epoch`` not above our epoch (a missing field counts
  as 0).
* A new owner stamps its epoch first (:meth:`FencedStore.stamp_user`): on all
  of the user's pending SMS and on its in-progress checkpoints, before its
  first LLM call.  From then on a stale host's writes to those documents match
  nothing.
* The flush's first write is a claim (:meth:`FencedStore.claim`): it stamps
  our epoch on the SMS of the flush, filtered as above.  Fewer matched than
  asked means a newer epoch has them: :class:`smsd.pipeline.StaleEpoch`, and
  the flush writes nothing at all.  SMS already processed (a replay of a row
  whose writes landed before a crash, or an SMS another host finished) are
  left out of the flush: their transactions are stored, so invariants 3-4
  hold for them and the journal row may be marked.
* Transaction upserts filter on the epoch too: if a newer epoch wrote the
  document, the filter misses and the upsert's insert collides on the
  deterministic ``_id`` (duplicate key): StaleEpoch.  The checkpoint upsert
  likewise.  ``isprocessed`` is set only where our own claim stamped.

What a single-document filter cannot refuse: a host that froze *between* its
claim and its transaction upsert, and wakes after a takeover, can still insert
a transaction document the new owner has not written yet (nothing exists to
filter on).  Its content is that SMS's answer at a deterministic ``_id``; its
``isprocessed`` write is refused, so the new owner flushes the SMS later and
replaces the document (and deletes positions its answer lacks).  The window
is the time between two consecutive writes of one flush.

Multi-document transactions: SecantusDB 0.7 runs them (it advertises a
one-node replica set), but it locks the documents a transaction wrote until
commit, and a writer outside it blocks: a host frozen inside a flush
transaction would stall the new owner's lease take for as long as it is
frozen.  mongod instead aborts the older side with a write conflict.  The
epoch filters above need neither and work the same on both, so smsd does not
use transactions for fencing.
"""
from __future__ import annotations

import logging
from typing import Any

from pymongo.errors import BulkWriteError, DuplicateKeyError

from .model import FlushItem
from .pipeline import StaleEpoch
from .store import ID_CHUNK, Store
from .store_docs import CHECKPOINTS_COLLECTION, RAW_COLLECTION, STATUS_IN_PROGRESS

EPOCH_FIELD = "smsd_epoch"
DUPLICATE_KEY = 11000

log = logging.getLogger("smsd.fencing")


class FencedStore(Store):
    """A :class:`smsd.store.Store` whose writes of one user's documents carry an epoch."""

    epoch: int = 0
    refused: int = 0    # flush writes MongoDB refused (for the worker's report and logs)

    def set_epoch(self, epoch: int) -> None:
        """Fence every following write with ``epoch`` (from the lease this host holds)."""
        self.epoch = int(epoch)
        self.fence_filter = {EPOCH_FIELD: {"$not": {"$gt": self.epoch}}}
        self.fence_fields = {EPOCH_FIELD: self.epoch}

    def _refused(self, user_id: str, what: str) -> StaleEpoch:
        self.refused += 1
        log.warning("user %s: %s refused by MongoDB: a newer epoch than %d owns the user "
                    "(StaleEpoch)", user_id, what, self.epoch)
        return StaleEpoch(f"user {user_id}: {what} refused by MongoDB at epoch {self.epoch}")

    def stamp_user(self, user_id: str) -> int:
        """A new owner's first write: our epoch on the user's pending SMS and open checkpoints.

        Costs one update of every pending SMS of the user, once per change of owner.
        Returns the SMS stamped.
        """
        with self._errors("stamp_user"):
            db = self._database()
            res = db[RAW_COLLECTION].update_many(
                {"user_id": user_id, "isprocessed": {"$ne": True}, **self.fence_filter},
                {"$set": self.fence_fields})
            db[CHECKPOINTS_COLLECTION].update_many(
                {"user_id": user_id, "status": STATUS_IN_PROGRESS, **self.fence_filter},
                {"$set": self.fence_fields})
        return int(res.modified_count)

    def claim(self, items: list[FlushItem]) -> list[FlushItem]:
        """The flush's first write: stamp our epoch on its SMS; return the items to write.

        Raises StaleEpoch when a newer epoch holds any of them.  Items whose SMS
        is already processed (or gone from the collection) are left out.
        """
        if not items:
            return items
        user_id = items[0].user_id
        ids = list(dict.fromkeys(item.raw_id for item in items))
        matched = 0
        with self._errors("claim"):
            for start in range(0, len(ids), ID_CHUNK):
                chunk = ids[start:start + ID_CHUNK]
                matched += int(self.raw.update_many(
                    {"_id": {"$in": chunk}, "user_id": user_id, "isprocessed": {"$ne": True},
                     **self.fence_filter}, {"$set": self.fence_fields}).matched_count)
            if matched == len(ids):
                return items
            skip: set[Any] = set(ids)    # what the read below does not show is gone
            for start in range(0, len(ids), ID_CHUNK):
                for doc in self.raw.find({"_id": {"$in": ids[start:start + ID_CHUNK]}},
                                         {"isprocessed": 1, EPOCH_FIELD: 1, "user_id": 1}):
                    if doc.get("isprocessed") is True or doc.get("user_id") != user_id:
                        continue     # done (by us before a crash, or by another host)
                    if int(doc.get(EPOCH_FIELD) or 0) > self.epoch:
                        raise self._refused(user_id, f"claim of {len(ids)} SMS ({matched} matched)")
                    skip.discard(doc["_id"])   # claimed by the update above
        return [item for item in items if item.raw_id not in skip]

    def upsert_transactions(self, items: list[FlushItem], *, replace_stale: Any = False) -> None:
        """As :meth:`Store.upsert_transactions`; a document of a newer epoch raises StaleEpoch."""
        try:
            super().upsert_transactions(items, replace_stale=replace_stale)
        except BulkWriteError as exc:
            if any(e.get("code") == DUPLICATE_KEY for e in exc.details.get("writeErrors", [])):
                raise self._refused(items[0].user_id, "transaction upsert") from exc
            raise

    def mark_processed(self, user_id: str, raw_ids: list, batch_id: str) -> int:
        """As :meth:`Store.mark_processed`, only on SMS still stamped with an epoch not above ours."""
        changed = super().mark_processed(user_id, raw_ids, batch_id)
        if changed < len(set(raw_ids)):
            ids = list(raw_ids)
            with self._errors("mark_processed"):
                newer = sum(self.raw.count_documents({"_id": {"$in": ids[i:i + ID_CHUNK]},
                                                      "isprocessed": {"$ne": True},
                                                      EPOCH_FIELD: {"$gt": self.epoch}})
                            for i in range(0, len(ids), ID_CHUNK))
            if newer:
                raise self._refused(user_id, "isprocessed update")
        return changed

    def checkpoint_progress(self, user_id: str, batch_id: str, **kw: Any) -> None:
        """As :meth:`Store.checkpoint_progress`; a checkpoint of a newer epoch raises StaleEpoch."""
        try:
            super().checkpoint_progress(user_id, batch_id, **kw)
        except DuplicateKeyError as exc:
            raise self._refused(user_id, "checkpoint update") from exc

