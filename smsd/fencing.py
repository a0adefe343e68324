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
* A flush of answers this turn did not ask itself (a replay of journal rows,
  an SMS asked again) begins with a claim (:meth:`FencedStore.claim`): it
  stamps our epoch on those SMS, filtered as above.  Fewer matched than asked
  means a newer epoch has them: :class:`smsd.pipeline.StaleEpoch`, and the
  flush writes nothing at all.  SMS already processed (a replay of a row whose
  writes landed before a crash, or an SMS another host finished) are left out
  of the flush: their transactions are stored, so invariants 3-4 hold for them
  and the journal row may be marked.  The answers of the turn's own calls skip
  it: their SMS were read pending by this turn, under its lease, so only a
  move of the lease can have changed them, and the gated transaction write
  and the fenced ``isprocessed`` below refuse that by themselves.  The claim
  was the dearest write of a flush (an update of every SMS, as dear as the
  ``isprocessed`` one on SecantusDB).  One thing it did for them is gone: an
  SMS deleted from the collection while its answer was out gets its
  transactions stored, as if it had been deleted just after its flush.
* Transaction documents are written by one ``aggregate`` on the user's lease
  document (:meth:`FencedStore._write_transactions`): ``$match`` the lease at
  our epoch, then the documents as a literal, ``$merge`` into
  ``financial_transactions``.  The lease check and the writes are one command
  executed by the server, so a client paused before it (SIGSTOP, GC, a cut
  link, packets in TCP retransmit) is checked when the command runs, not when
  it was sent: once a newer epoch took the lease, the ``$match`` finds nothing
  and nothing is written -- an insert of a document the new owner has not
  written yet included (what the per-document epoch filter alone could not
  refuse).  ``whenMatched`` keeps a document of a newer epoch.  Then one read
  of the lease: still at our epoch means the ``$match`` matched and no newer
  epoch ever existed (epochs only grow), so every document is stored as sent;
  otherwise the documents at our epoch are counted, and fewer than sent is
  StaleEpoch.  A run's new
  checkpoint (``checkpoint_start``) is inserted the same way.
* The checkpoint upsert filters on the epoch: a newer epoch's checkpoint makes
  it collide on its ``_id``: StaleEpoch.  ``isprocessed`` is set only where
  our own claim stamped.
* After a change of owner (epoch above 1) every flush deletes the SMS's
  transaction documents that its answer lacks (``replace_stale``): an older
  owner may have stored more positions for an SMS it never marked processed.

What remains: ``$merge`` is not a transaction on mongod, so a lease take that
commits *while* the server executes one of those aggregates (after its
``$match``, before its writes) does not stop it.  That window is inside one
server command, not extendable by anything the stale client does; the new
owner's own flush of those SMS comes after its take, its stamp and an LLM call,
and replaces the documents at the same ``_id`` and deletes the positions its
answer lacks.  The writes the flush does after its transactions
(``isprocessed``, the checkpoint) are refused by the stamp of the new owner.

Multi-document transactions: SecantusDB 0.7 runs them (it advertises a
one-node replica set), but it locks the documents a transaction wrote until
commit, and a writer outside it blocks: a host frozen inside a flush
transaction would stall the new owner's lease take for as long as it is
frozen.  mongod instead aborts the older side with a write conflict.  The
lease-gated ``$merge`` and the epoch filters need neither and work the same on
both, so smsd does not use transactions for fencing.
"""
from __future__ import annotations

import logging
from typing import Any

from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure

from .model import FlushItem
from .pipeline import StaleEpoch
from .store import ID_CHUNK, Store
from .store_errors import DUPLICATE_KEY
from .lease import LEASES_COLLECTION
from .store_docs import (CHECKPOINTS_COLLECTION, RAW_COLLECTION, STATUS_IN_PROGRESS,
                         TRANSACTIONS_COLLECTION)

EPOCH_FIELD = "smsd_epoch"

log = logging.getLogger("smsd.fencing")

#: ``whenMatched`` of a gated ``$merge``: a stored document of a newer epoch than the one
#: written stays ($$ROOT is the stored one, $$new ours, which carries its writer's epoch).
KEEP_NEWER = [{"$replaceWith": {"$cond": [
    {"$gt": [{"$ifNull": [f"${EPOCH_FIELD}", 0]}, {"$ifNull": [f"$$new.{EPOCH_FIELD}", 0]}]},
    "$$ROOT", "$$new"]}}]


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
        """As :meth:`Store.upsert_transactions`, gated on our lease; refused: StaleEpoch.

        After a change of owner (epoch above 1) the positions an answer lacks are
        always deleted: an older owner may have stored more for these SMS.
        """
        if self.epoch > 1:
            replace_stale = True
        try:
            super().upsert_transactions(items, replace_stale=replace_stale)
        except BulkWriteError as exc:
            if any(e.get("code") == DUPLICATE_KEY for e in exc.details.get("writeErrors", [])):
                raise self._refused(items[0].user_id, "transaction upsert") from exc
            raise

    def _write_transactions(self, user_id: str, docs: list[dict]) -> None:
        """Write ``docs`` only while the user's lease is at our epoch (:meth:`_gated_merge`).

        Without an epoch (no lease: a plain store's behaviour) they are upserted as usual.
        """
        if not self.epoch:
            super()._write_transactions(user_id, docs)
            return
        written = self._gated_merge(user_id, TRANSACTIONS_COLLECTION, docs, KEEP_NEWER)
        self.check_written(user_id, written, len(docs))

    def check_written(self, user_id: str, written: int, sent: int) -> None:
        """StaleEpoch unless all ``sent`` transaction documents are stored at our epoch."""
        if written < sent:
            raise self._refused(user_id, f"transaction upsert ({written} of {sent} stored)")

    def _insert_checkpoint(self, doc: dict) -> None:
        """A run's new checkpoint, only while the user's lease is at our epoch."""
        if not self.epoch:
            super()._insert_checkpoint(doc)
        elif not self._gated_merge(doc["user_id"], CHECKPOINTS_COLLECTION, [doc], "keepExisting"):
            raise self._refused(doc["user_id"], "checkpoint start")

    def _gated_merge(self, user_id: str, into: str, docs: list[dict], when_matched: Any) -> int:
        """Merge ``docs`` into ``into`` in one server command per chunk that reads the lease first.

        ``aggregate`` on ``smsd_leases``: ``$match`` the user's lease at our
        epoch (or nothing), the documents as a literal, ``$merge`` by ``_id``.
        Returns how many of ``docs`` are stored at our epoch afterwards.
        """
        db = self._database()
        merge = {"into": into, "on": "_id", "whenMatched": when_matched, "whenNotMatched": "insert"}
        written = 0
        with self._errors("gated write"):
            for start in range(0, len(docs), ID_CHUNK):
                chunk = docs[start:start + ID_CHUNK]
                try:
                    db[LEASES_COLLECTION].aggregate([
                        {"$match": {"_id": user_id, "epoch": self.epoch}},
                        {"$project": {"_id": 0, "doc": {"$literal": chunk}}},
                        {"$unwind": "$doc"},
                        {"$replaceWith": "$doc"},
                        {"$merge": merge},
                    ])
                except OperationFailure as exc:
                    if exc.code != DUPLICATE_KEY:
                        raise
                    # Another writer inserted one of these _ids at the same moment: only
                    # another owner writes this user's documents.
                    raise self._refused(user_id, f"write to {into} (duplicate key)") from exc
            if self.lease_at_our_epoch(user_id):
                return len(docs)
            for start in range(0, len(docs), ID_CHUNK):
                written += self.count_at_our_epoch(into, docs[start:start + ID_CHUNK])
        return written

    def lease_at_our_epoch(self, user_id: str) -> bool:
        """Whether the user's lease is (still) at our epoch: one read by ``_id``.

        After a gated write it proves the write's ``$match`` matched and nothing of a
        newer epoch could be kept by ``whenMatched``: epochs only grow.
        """
        doc = self._database()[LEASES_COLLECTION].find_one({"_id": user_id}, {"epoch": 1})
        return doc is not None and doc.get("epoch") == self.epoch

    def count_at_our_epoch(self, into: str, docs: list[dict]) -> int:
        """How many of ``docs`` are stored in ``into`` at our epoch (the refused path's count)."""
        return int(self._database()[into].count_documents(
            {"_id": {"$in": [d["_id"] for d in docs]}, EPOCH_FIELD: self.epoch}))

    def mark_processed(self, user_id: str, raw_ids: list, batch_id: str) -> int:
        """As :meth:`Store.mark_processed`, only on SMS still stamped with an epoch not above ours."""
        return self.check_marked(user_id, raw_ids, super().mark_processed(user_id, raw_ids, batch_id))

    def check_marked(self, user_id: str, raw_ids: list, changed: int) -> int:
        """``changed`` of ``raw_ids`` newly marked: StaleEpoch if a newer epoch holds any unmarked one."""
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

