"""``cost`` benchmark: tokens per SMS and USD per 1,000 SMS, before and after the token diet.

Two halves, both with OpenAI's own BPE encoding (:mod:`smsd.tokens`, offline):

* **requests as built** — the daemon's :class:`~smsd.llm.LlmClient` builds the exact
  request of each call (system prompt, user document, schema) for the bench
  corpus and the labelled fixtures, in backfill (full batches) and trickle (calls
  of 1, 2 and 3 SMS in turn); the answer a model gives is the known answer in the
  schema's shape (strict: every field, null when absent; non-strict: absent
  fields left out), compact JSON.  *Before* is smsd as it was before the diet
  (SMS keys such as ``o:65f1…`` as ids, ``json.dumps`` default separators, the
  strict schema); *after* is the current default.  USD at gpt-4o-mini's list
  prices, with OpenAI's prompt caching (a prefix of 1024 tokens or more, seen
  before, billed at the cached price in steps of 128).
* **end to end** — ``smsd once`` against the local LLM server (which bills with
  the same encoding and caches prefixes as OpenAI does): the journal's ledger
  gives tokens and USD per SMS for backfill, trickle (one user at a time with 2
  new SMS each) and ``rules-then-llm``; and trickle under ``smsd run`` (many
  users with 2 new SMS each, all waiting at once) with trickle batching off
  (``pipeline.trickle_group_max_users = 1``: a call per user) and on (the
  default: small users share a group turn and their calls), side by side.
"""
from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Any, Iterable

from .harness import BENCH_MODEL, Bench, BenchResult, Figure

PRICE_MODEL = "gpt-4o-mini"
CACHE_MIN, CACHE_STEP = 1024, 128
TRICKLE_SIZES = (1, 2, 3)
#: llm.batch_size before the token diet.
BEFORE_BATCH = 10


def _sms(bench: Bench, n: int, start: int = 0) -> list[Any]:
    from bson import ObjectId

    from ...model import Sms, sms_key
    out = []
    for doc in bench.corpus.docs("bench", n, start):
        raw = ObjectId()
        out.append(Sms(raw_id=raw, key=sms_key(raw), user_id="bench", text=doc["body"],
                       sender=doc["sender"], received_at=doc["received_at"]))
    return out


def _fixture_sms() -> tuple[list[Any], dict[str, dict]]:
    from datetime import datetime, timedelta, timezone

    from bson import ObjectId

    from ...model import Sms, sms_key
    from ..demo_seed import fixture_lines
    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    sms, answers = [], {}
    for i, line in enumerate(fixture_lines()):
        raw = ObjectId()
        s = Sms(raw_id=raw, key=sms_key(raw), user_id="bench", text=line["text"], sender=line.get("sender"),
                received_at=base + timedelta(minutes=i))
        sms.append(s)
        answers[s.text] = line["expected"]
    return sms, answers


def _batches(sms: list[Any], sizes: Iterable[int]) -> list[list[Any]]:
    out, i, sizes = [], 0, list(sizes)
    k = 0
    while i < len(sms):
        n = sizes[k % len(sizes)]
        out.append(sms[i:i + n])
        i += n
        k += 1
    return out


def _answer_tokens(batch: list[Any], wire: list[str], answers: dict[str, dict], strict: bool) -> int:
    from ... import tokens
    from ...model import OPTIONAL_FIELDS

    def shaped(t: dict) -> dict:
        if strict:
            return {**t, **{k: t.get(k) for k in OPTIONAL_FIELDS}}
        return {k: v for k, v in t.items() if v is not None or k not in OPTIONAL_FIELDS}
    results = [{"id": w, "kind": answers[s.text]["kind"],
                "transactions": [shaped(t) for t in answers[s.text]["transactions"]]}
               for s, w in zip(batch, wire)]
    return tokens.count(json.dumps({"results": results}, ensure_ascii=False, separators=(",", ":")))


def _grouped(sms: list[Any], sizes: Iterable[int], batch_size: int, most: int) -> list[list[Any]]:
    """Calls as trickle batching fills them: users of ``sizes`` new SMS (in turn) packed into
    calls of at most ``most`` users and ``batch_size`` SMS, as :func:`smsd.scheduler.group_turns`
    packs a group turn (a user's SMS stay in one call)."""
    out: list[list[Any]] = []
    users = 0
    for part in _batches(sms, sizes):
        if out and users < most and len(out[-1]) + len(part) <= batch_size:
            out[-1].extend(part)
            users += 1
        else:
            out.append(list(part))
            users = 1
    return out


def _variant(name: str) -> tuple[Any, bool, bool]:
    """(client, strict, legacy user document) of a variant."""
    from ...llm import LlmClient
    strict = name != "after"
    client = LlmClient(base_url="http://127.0.0.1:9/v1", api_key=None, model=PRICE_MODEL,
                       strict_schema=strict, short_ids=name != "before")
    return client, strict, name == "before"


def measure(batches: list[list[Any]], answers: dict[str, dict], name: str) -> dict:
    """Prompt, cached and completion tokens of ``batches`` asked as variant ``name``."""
    from ... import tokens
    from ...llm import SYSTEM_PROMPT
    client, strict, legacy = _variant(name)
    prefix = tokens.prefix_tokens(SYSTEM_PROMPT, client.request(batches[0])["response_format"])
    prompt = cached = completion = 0
    for n, batch in enumerate(batches):
        req = client.request(batch)
        wire = client.wire_ids(batch)
        if legacy:   # the user document as smsd wrote it before: default separators
            req["messages"][1]["content"] = json.dumps({"sms": [s.wire() for s in batch]}, ensure_ascii=False)
        prompt += tokens.request_tokens(req["messages"], req["response_format"])
        if n and prefix >= CACHE_MIN:
            cached += CACHE_MIN + (prefix - CACHE_MIN) // CACHE_STEP * CACHE_STEP
        completion += _answer_tokens(batch, wire, answers, strict)
    client.close()
    sms = sum(len(b) for b in batches)
    return {"sms": sms, "calls": len(batches), "prefix": prefix, "prompt": prompt, "cached": cached,
            "completion": completion}


def usd_per_1000(m: dict, paid_share: Decimal = Decimal(1)) -> Decimal:
    """USD per 1,000 SMS at gpt-4o-mini's list prices (``paid_share``: SMS that reach the LLM)."""
    from ...ledger import DEFAULT_PRICES, cost_usd
    from ...model import Usage
    usd = cost_usd(Usage(prompt_tokens=m["prompt"], completion_tokens=m["completion"],
                         cached_tokens=m["cached"]), DEFAULT_PRICES[PRICE_MODEL])
    return (usd / m["sms"] * 1000 * paid_share).quantize(Decimal("0.0001"))


def _offline(bench: Bench, res: BenchResult, batch_size: int, most: int) -> dict:
    corpus_answers = {t: e for t, _, e in bench.corpus.items}
    corpus = _sms(bench, bench.params.cost_sms)
    fixtures, fixture_answers = _fixture_sms()
    table = {}
    for label, sms, answers in (("bench corpus", corpus, corpus_answers),
                                ("fixtures", fixtures, fixture_answers)):
        for mode, sizes in (("backfill", (batch_size,)), ("trickle", TRICKLE_SIZES)):
            for name in ("before", "after-strict", "after"):
                # "before" is smsd as it was, with its default batch of 10 SMS.
                use = (BEFORE_BATCH,) if name == "before" and mode == "backfill" else sizes
                table[(label, mode, name)] = measure(_batches(sms, use), answers, name)
        table[(label, "trickle, grouped", "after")] = measure(
            _grouped(sms, TRICKLE_SIZES, batch_size, most), answers, "after")
    res.details.append(f"Requests as built by `LlmClient` for {len(corpus)} SMS of the bench corpus and the "
                       f"{len(fixtures)} labelled fixtures; backfill = batches of {batch_size} "
                       f"({BEFORE_BATCH} before), trickle = "
                       "calls of 1, 2, 3 SMS in turn (2 on average); trickle, grouped = the same users' "
                       f"SMS filled into calls of up to {most} users and {batch_size} SMS (trickle "
                       "batching). Tokens per SMS, counted with "
                       "o200k_base (gpt-4o-mini's encoding) over system prompt + user message + schema.")
    res.details.append("")
    res.details.append("| corpus | mode | variant | prompt/SMS | completion/SMS | prefix tokens | "
                       "USD / 1,000 SMS |")
    res.details.append("|---|---|---|---|---|---|---|")
    for (label, mode, name), m in table.items():
        res.details.append(f"| {label} | {mode} | {name} | {m['prompt'] / m['sms']:.1f} | "
                           f"{m['completion'] / m['sms']:.1f} | {m['prefix']} | {usd_per_1000(m)} |")
    from ... import rules
    certain = sum(1 for s in fixtures if rules.extract_certain(s.text, s.sender) is not None)
    share = Decimal(len(fixtures) - certain) / len(fixtures)
    m = table[("fixtures", "backfill", "after")]
    table[("fixtures", "backfill", "rules-then-llm")] = dict(m, paid_share=str(share))
    res.details.append(f"| fixtures | backfill | after, rules-then-llm ({certain} of {len(fixtures)} "
                       f"answered by the rules) | | | | {usd_per_1000(m, share)} |")
    sizes_row = []
    for b in (10, 25, 50):
        m = measure(_batches(corpus, (b,)), corpus_answers, "after")
        sizes_row.append(f"{b}: {m['prompt'] / m['sms']:.1f} prompt, USD {usd_per_1000(m)}")
    res.details.append("")
    res.details.append("Backfill by batch size (bench corpus, after): " + "; ".join(sizes_row) + ".")
    return table


def _e2e(bench: Bench, label: str, users: int, per_user: int, shared: int = 0, **llm: Any) -> dict:
    """``smsd once`` per user against the local server; the journals' ledger totals.

    ``shared``: each user's first ``shared`` SMS are the same texts for every user
    (promotions, notices); the rest are the user's own."""
    from ...journal_scan import scan
    from ...ledger import DEFAULT_PRICES
    db, directory = bench.fresh(f"cost_{label}")
    mini = DEFAULT_PRICES[PRICE_MODEL]
    from ...config import LlmSettings
    settings = {"concurrency": 1, "batch_size": LlmSettings().batch_size}
    config = bench.write_config(directory, db, llm=dict(settings, **llm), **{
        f'llm.prices."{BENCH_MODEL}"': {"input": str(mini.input), "cached_input": str(mini.cached_input),
                                        "output": str(mini.output)}})
    for u in range(users):
        if shared:
            bench.seed(db, f"c{u}", shared, start=0)
        bench.seed(db, f"c{u}", per_user - shared, start=shared + u * per_user)
    t0 = time.monotonic()
    for u in range(users):
        proc = bench.smsd(config, "once", "--user-id", f"c{u}", "--quiet")
        code = proc.wait(timeout=bench.params.run_timeout)
        if code != 0:
            raise RuntimeError(f"smsd once for c{u} exited with {code} (see {config.parent})")
    took = time.monotonic() - t0
    stats = list(scan(directory / "state").values())
    bench.drop(db)
    out = {k: sum(int(s.get(k) or 0) for s in stats)
           for k in ("prompt_tokens", "completion_tokens", "cached_tokens", "paid_sms", "free_sms", "calls")}
    out["cost_usd"] = sum((Decimal(s.get("cost_usd") or 0) for s in stats), Decimal(0))
    out["sms"] = users * per_user
    out["seconds"] = took
    return out


def _e2e_run(bench: Bench, label: str, users: int, most: int) -> dict:
    """``smsd run`` with ``users`` users of 2 new SMS each, all waiting at once; journals' ledger."""
    from ...config import LlmSettings
    from ...journal_scan import scan
    from ...ledger import DEFAULT_PRICES
    import shutil
    import tempfile
    db, directory = bench.fresh(f"cost_{label}")
    mini = DEFAULT_PRICES[PRICE_MODEL]
    # The control socket's path must fit AF_UNIX's 107 bytes whatever --tmp is.
    run_dir = tempfile.mkdtemp(prefix="smsd-run-")
    config = bench.write_config(directory, db, llm={"concurrency": 1, "batch_size": LlmSettings().batch_size,
                                                    "answer_cache": False},
                                pipeline={"trickle_group_max_users": most},
                                supervisor={"runtime_dir": run_dir}, **{
        f'llm.prices."{BENCH_MODEL}"': {"input": str(mini.input), "cached_input": str(mini.cached_input),
                                        "output": str(mini.output)}})
    names = [f"g{u}" for u in range(users)]
    for u, name in enumerate(names):
        bench.seed(db, name, 2, start=u * 2)
    bench.llm.reset()
    t0 = time.monotonic()
    proc = bench.smsd(config, "run")
    try:
        bench.wait_processed(db, names, users * 2, proc, bench.params.run_timeout)
        took = time.monotonic() - t0
    finally:
        bench.stop_smsd(proc)
        shutil.rmtree(run_dir, ignore_errors=True)
    stats = list(scan(directory / "state").values())
    bench.drop(db)
    out = {k: sum(int(s.get(k) or 0) for s in stats)
           for k in ("prompt_tokens", "completion_tokens", "cached_tokens", "paid_sms", "free_sms", "calls",
                     "repeated_calls")}
    # A group's combined call is one journal row per user: the calls are those the LLM server answered.
    out["journal_rows"], out["calls"] = out["calls"], bench.llm.stats()["calls"]
    out["cost_usd"] = sum((Decimal(s.get("cost_usd") or 0) for s in stats), Decimal(0))
    out["sms"] = users * 2
    out["seconds"] = took
    return out


def bench_cost(bench: Bench) -> BenchResult:
    """Tokens per SMS and USD per 1,000 SMS: requests as built, then end to end."""
    from ...config import LlmSettings
    res = BenchResult("cost")
    from ...config import PipelineSettings
    batch_size = LlmSettings().batch_size
    most = PipelineSettings().trickle_group_max_users
    table = _offline(bench, res, batch_size, most)
    before = table[("bench corpus", "backfill", "before")]
    after = table[("bench corpus", "backfill", "after")]
    trickle = table[("bench corpus", "trickle", "after")]
    grouped = table[("bench corpus", "trickle, grouped", "after")]
    pp, cp = after["prompt"] / after["sms"], after["completion"] / after["sms"]
    gp = grouped["prompt"] / grouped["sms"]
    res.figures += [
        Figure("cost", "backfill prompt tokens per SMS, before", before["prompt"] / before["sms"], "tokens"),
        Figure("cost", "backfill prompt tokens per SMS, after", pp, "tokens", "≤ 120", pp <= 120),
        Figure("cost", "backfill completion tokens per SMS, before", before["completion"] / before["sms"],
               "tokens"),
        Figure("cost", "backfill completion tokens per SMS, after", cp, "tokens", "≤ 60", cp <= 60),
        Figure("cost", "trickle / backfill prompt tokens per SMS, one user per call",
               (trickle["prompt"] / trickle["sms"]) / pp, "ratio"),
        Figure("cost", "trickle prompt tokens per SMS, grouped", gp, "tokens"),
        Figure("cost", "trickle / backfill prompt tokens per SMS, after (grouped)", gp / pp, "ratio", "≤ 1.5",
               gp / pp <= 1.5),
        Figure("cost", "prefix (system prompt + schema) tokens, after", after["prefix"], "tokens"),
        Figure("cost", "USD per 1,000 SMS, backfill, before", float(usd_per_1000(before)), "USD"),
        Figure("cost", "USD per 1,000 SMS, backfill, after", float(usd_per_1000(after)), "USD"),
        Figure("cost", "USD per 1,000 SMS, trickle, after", float(usd_per_1000(trickle)), "USD"),
        Figure("cost", "USD per 1,000 SMS, trickle, grouped", float(usd_per_1000(grouped)), "USD"),
        Figure("cost", "USD per 1,000 SMS, fixtures backfill, after",
               float(usd_per_1000(table[("fixtures", "backfill", "after")])), "USD"),
        Figure("cost", "USD per 1,000 SMS, fixtures backfill, rules-then-llm",
               float(usd_per_1000(table[("fixtures", "backfill", "after")],
                                  Decimal(table[("fixtures", "backfill", "rules-then-llm")]["paid_share"]))),
               "USD"),
    ]
    p = bench.params
    users, each = p.cost_cache_users, p.cost_sms // p.cost_cache_users
    shared = each * 3 // 10
    repeated = Decimal((users - 1) * shared) / (users * each)
    runs = {"backfill": _e2e(bench, "backfill", 1, p.cost_sms, answer_cache=False),
            f"backfill, {users} users, answer cache on, {repeated:.0%} repeated texts":
                _e2e(bench, "cache", users, each, shared=shared),
            "trickle (2 new SMS per user)": _e2e(bench, "trickle", p.cost_trickle_users, 2, answer_cache=False),
            "rules-then-llm, backfill": _e2e(bench, "rules", 1, p.cost_sms, extractor="rules-then-llm",
                                             answer_cache=False),
            # Side by side in the same run: trickle batching off (baseline) and on.
            f"trickle under smsd run, {p.cost_group_users} users x 2 SMS, one user per turn":
                _e2e_run(bench, "trickle_off", p.cost_group_users, 1),
            f"trickle under smsd run, {p.cost_group_users} users x 2 SMS, grouped (up to {most} users)":
                _e2e_run(bench, "trickle_on", p.cost_group_users, most)}
    res.details.append("")
    res.details.append(f"End to end: `smsd once` per user against the local LLM server (o200k_base usage, "
                       f"OpenAI-style prefix caching), defaults (batch {batch_size}, non-strict schema, "
                       "short ids); figures from the journals' ledger. The last two rows: `smsd run` "
                       "(4 workers) with every user waiting at once, trickle batching off and on; their "
                       "calls are the calls the LLM server answered.")
    res.details.append("")
    res.details.append("| run | SMS | calls | prompt/paid SMS | cached/paid SMS | completion/paid SMS | "
                       "SMS by rules or cache | USD / 1,000 SMS |")
    res.details.append("|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        usd = (r["cost_usd"] / r["sms"] * 1000).quantize(Decimal("0.0001"))
        paid = max(1, r["paid_sms"])
        res.details.append(f"| {name} | {r['sms']} | {r['calls']} | {r['prompt_tokens'] / paid:.1f} | "
                           f"{r['cached_tokens'] / paid:.1f} | {r['completion_tokens'] / paid:.1f} | "
                           f"{r['free_sms']} | {usd} |")
        res.figures.append(Figure("cost", f"USD per 1,000 SMS end to end, {name}", float(usd), "USD"))
    off, on = list(runs.values())[-2:]
    e2e_off, e2e_on = off["prompt_tokens"] / max(1, off["paid_sms"]), on["prompt_tokens"] / max(1, on["paid_sms"])
    res.figures += [
        Figure("cost", "trickle under smsd run: prompt tokens per SMS, one user per turn", e2e_off, "tokens"),
        Figure("cost", "trickle under smsd run: prompt tokens per SMS, grouped", e2e_on, "tokens"),
        Figure("cost", "trickle under smsd run: LLM calls, grouped / one user per turn",
               on["calls"] / max(1, off["calls"]), "ratio"),
        Figure("cost", "trickle under smsd run, grouped / backfill prompt tokens per SMS", e2e_on / pp, "ratio",
               "≤ 1.5", e2e_on / pp <= 1.5),
    ]
    tp = trickle["prompt"] / trickle["sms"]
    res.notes.append(
        f"**Prefix.** Every call starts with the same {after['prefix']} tokens (system prompt, then "
        "the schema; byte-identical from call to call: `tests/daemon/test_token_diet.py`). That is above "
        "OpenAI's 1024-token prompt-caching threshold, so from the second call on about "
        f"{CACHE_MIN + (after['prefix'] - CACHE_MIN) // CACHE_STEP * CACHE_STEP} of them are billed at the "
        "cached price (half, for gpt-4o-mini) while the cache is warm (minutes; always, for a busy host).")
    res.notes.append(
        "**Strict or not.** The strict schema makes the model write every field (null when absent); the "
        "non-strict one (the contract schema without its annotations) lets it leave them out: "
        f"{table[('bench corpus', 'backfill', 'after-strict')]['completion'] / after['sms']:.1f} vs "
        f"{cp:.1f} completion tokens per SMS here, and output tokens cost 4x input ones. smsd validates "
        "every answer itself (missing optional fields are accepted, anything invalid is asked again), so "
        "the cheaper default, non-strict, keeps correctness. The local server shapes its answers by the "
        "schema mode; a real model in non-strict mode may still write some nulls, so the saving measured "
        "here is the most it can be.")
    res.notes.append(
        f"**Trickle.** With 1-3 new SMS per call, the prefix is shared by 2 SMS instead of {batch_size}: "
        f"{tp:.0f} prompt tokens per SMS, {tp / pp:.1f}x backfill. Trickle batching "
        f"(`pipeline.trickle_group_max_users`, default {most}) gives a worker a group of small users "
        "whose pipelines share one combiner: their SMS go in one call, each user's answers are committed "
        f"to its own journal. Requests as built: {gp:.0f} prompt tokens per SMS, {gp / pp:.2f}x backfill; "
        f"under `smsd run`: {e2e_off:.0f} -> {e2e_on:.0f} prompt tokens per SMS, {on['calls']} calls "
        f"instead of {off['calls']}, {e2e_on / pp:.2f}x backfill (target 1.5x). A group fills its call "
        "only when its users' SMS are waiting together (here all at once; in a 24/7 trickle, the users "
        "a discovery finds with new SMS).")
    res.extra["offline"] = {" / ".join(k): v for k, v in table.items()}
    res.extra["e2e"] = {k: {kk: str(vv) for kk, vv in v.items()} for k, v in runs.items()}
    return res
