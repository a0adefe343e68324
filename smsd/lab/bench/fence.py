"""``fence`` benchmark: what the lease-gated transaction write costs a flush.

One flush's transaction write (``upsert_transactions`` of ``batch_size`` SMS,
one document each, ``j: true``) on the bench's MongoDB-wire server, four ways
interleaved flush by flush in one run:

* ``unfenced``: one bulk ``ReplaceOne`` upsert per document (a plain store);
* ``epoch filter``: the same bulk with the epoch filter (the fenced write before
  the lease gate: it could not refuse an insert);
* ``lease-gated``: one ``aggregate`` on the lease document with ``$merge``, then a
  count of what it stored (:meth:`smsd.fencing.FencedStore._write_transactions`);
* ``lease-gated, epoch 2``: the same after a change of owner, which also looks
  for positions an older owner left (one ``find``).
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from .harness import BENCH_MODEL, Bench, BenchResult, Figure, _fmt, median

MODES = ("unfenced", "epoch filter", "lease-gated", "lease-gated, epoch 2")
FLUSHES = 60     # per mode and run


def _items(bench: Bench, docs: list[dict], epoch: int) -> list[Any]:
    from ...model import FlushItem, Provenance, sms_key
    prov = Provenance(call_id="bench", model=BENCH_MODEL, request_id=None,
                      answered_at=datetime.now(timezone.utc), owner="bench", epoch=epoch)
    return [FlushItem(raw_id=d["_id"], user_id=d["user_id"], result=bench.corpus.result(sms_key(d["_id"]), d["body"]),
                      provenance=prov) for d in docs]


def _stores(bench: Bench, db_name: str) -> dict[str, Any]:
    from ...fencing import EPOCH_FIELD, FencedStore
    from ...lease import Leases
    from ...store import Store
    plain = Store(bench.mongo_uri, db_name)
    filtered = Store(bench.mongo_uri, db_name)
    filtered.fence_filter = {EPOCH_FIELD: {"$not": {"$gt": 1}}}
    filtered.fence_fields = {EPOCH_FIELD: 1}
    gated = FencedStore(bench.mongo_uri, db_name)
    gated.set_epoch(Leases(gated._database(), "bench-a", ttl=3600).take("u-gated").epoch)
    second = FencedStore(bench.mongo_uri, db_name)
    db = second._database()
    Leases(db, "bench-a", ttl=3600).take("u-second")
    Leases(db, "bench-a", ttl=3600).release("u-second")
    second.set_epoch(Leases(db, "bench-b", ttl=3600).take("u-second").epoch)
    return dict(zip(MODES, (plain, filtered, gated, second)))


def bench_fence(bench: Bench) -> BenchResult:
    """Median time of one flush's transaction write, four ways, interleaved."""
    p = bench.params
    res = BenchResult("fence")
    db_name, _ = bench.fresh("fence")
    users = dict(zip(MODES, ("u-plain", "u-filter", "u-gated", "u-second")))
    stores = _stores(bench, db_name)
    stores["unfenced"].ensure_indexes()
    times: dict[str, list[float]] = {m: [] for m in MODES}
    flushes = max(10, FLUSHES if p.runs > 1 else FLUSHES // 3) * p.runs
    try:
        pending = {m: bench.seed(db_name, users[m], flushes * p.batch_size) for m in MODES}
        for f in range(flushes):
            order = MODES if f % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                store = stores[mode]
                docs = pending[mode][f * p.batch_size:(f + 1) * p.batch_size]
                items = _items(bench, docs, getattr(store, "epoch", 0))
                t0 = time.perf_counter()
                store.upsert_transactions(items)
                times[mode].append((time.perf_counter() - t0) * 1000.0)
    finally:
        for store in stores.values():
            store.close()
        bench.drop(db_name)
    base = median(times["epoch filter"])
    for mode in MODES:
        res.figures.append(Figure("fence", f"transaction write of one {p.batch_size}-SMS flush, {mode}, median",
                                  median(times[mode]), "ms"))
    gated = median(times["lease-gated"])
    if base and gated:
        res.figures.append(Figure("fence", "lease-gated ÷ epoch filter", gated / base, "ratio"))
    res.details.append(f"{flushes} flushes of {p.batch_size} SMS per mode, the modes interleaved flush by "
                       "flush (order reversed every other flush), one server, `j: true`.")
    res.details.append("")
    res.details.append("| write | median | p90 |")
    res.details.append("|---|---|---|")
    for mode in MODES:
        t = sorted(times[mode])
        res.details.append(f"| {mode} | {_fmt(median(t), 'ms')} | {_fmt(t[int(0.9 * (len(t) - 1))], 'ms')} |")
    return res
