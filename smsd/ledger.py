"""The LLM bill in dollars: prices per model, the USD of a call, the ledger's totals.

Prices are USD per 1M tokens (input, cached input, output), a table in
``config.toml`` (``[llm.prices."MODEL"]``) on top of :data:`DEFAULT_PRICES`.
A call's price is ``(prompt - cached) x input + cached x cached_input +
completion x output``, in :class:`~decimal.Decimal` (never a float).

The journal keeps, in the commit of each answer, the call's cached tokens and
USD and a ledger row per UTC day and model (:func:`add_to_ledger`); the
pipeline copies changed rows to MongoDB's :data:`COSTS_COLLECTION` with
``$max`` (:func:`sync_costs`), so a replay never counts twice.  SMS answered
without a paid call (``rules``, ``cache``) are ledger rows of their own; what
they saved is priced at the average USD per SMS of the paid calls
(:func:`totals`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable, Mapping

from bson.decimal128 import Decimal128

from .model import Usage

log = logging.getLogger("smsd.ledger")

#: MongoDB collection of the bill per user, UTC day and model (``_id = user|day|model``).
COSTS_COLLECTION = "smsd_llm_costs"
#: Models of ledger rows whose SMS were answered without a paid call.
FREE_MODELS = ("rules", "cache")
MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class Price:
    """USD per 1M tokens of one model, and the Batch API's discount (0.5 = half price)."""

    input: Decimal
    cached_input: Decimal
    output: Decimal
    batch_discount: Decimal = Decimal("0.5")


def _p(i: str, c: str, o: str) -> Price:
    return Price(Decimal(i), Decimal(c), Decimal(o))


#: OpenAI list prices, standard tier, USD per 1M tokens (openai.com/api/pricing).
#: Edit or extend them in config.toml; a dated snapshot ("gpt-4o-mini-2024-07-18")
#: takes the price of its family.
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-4o-mini": _p("0.15", "0.075", "0.60"),
    "gpt-4o": _p("2.50", "1.25", "10.00"),
    "gpt-4.1": _p("2.00", "0.50", "8.00"),
    "gpt-4.1-mini": _p("0.40", "0.10", "1.60"),
    "gpt-4.1-nano": _p("0.10", "0.025", "0.40"),
    "gpt-5": _p("1.25", "0.125", "10.00"),
    "gpt-5-mini": _p("0.25", "0.025", "2.00"),
    "gpt-5-nano": _p("0.05", "0.005", "0.40"),
    "o4-mini": _p("1.10", "0.275", "4.40"),
}
PRICE_FIELDS = ("input", "cached_input", "output", "batch_discount")


def parse_prices(raw: Mapping[str, Any], where: str) -> dict[str, Price]:
    """``[llm.prices."MODEL"]`` tables → prices, on top of the defaults.

    Values may be strings ("0.15", exact) or TOML numbers (read through their
    shortest decimal form).  Raises ValueError naming the bad key.
    """
    prices = dict(DEFAULT_PRICES)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: llm.prices must be a table of models")
    for name, table in raw.items():
        if not isinstance(table, Mapping):
            raise ValueError(f"{where}: llm.prices.{name} must be a table")
        unknown = set(table) - set(PRICE_FIELDS)
        if unknown:
            raise ValueError(f"{where}: unknown setting llm.prices.{name}.{sorted(unknown)[0]}")
        base = prices.get(name)
        values: dict[str, Decimal] = {}
        for key in PRICE_FIELDS:
            if key in table:
                values[key] = _decimal(table[key], f"{where}: llm.prices.{name}.{key}")
            elif base is not None:
                values[key] = getattr(base, key)
            elif key == "cached_input":
                values[key] = values.get("input", Decimal(0))
            elif key == "batch_discount":
                values[key] = Decimal("0.5")
            else:
                raise ValueError(f"{where}: llm.prices.{name} needs {key}")
        prices[name] = Price(**values)
    return prices


def _decimal(value: Any, name: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{name}: expected a decimal number")
    try:
        # repr() of a float is its shortest round-tripping decimal: 0.15 -> "0.15".
        d = Decimal(value if isinstance(value, str) else repr(value))
    except InvalidOperation:
        raise ValueError(f"{name}: {value!r} is not a decimal number") from None
    if not d.is_finite() or d < 0:
        raise ValueError(f"{name}: must be a number >= 0")
    return d


def price_for(model: str, prices: Mapping[str, Price]) -> Price | None:
    """The price of ``model``: exact name, else the longest family prefix ("gpt-4o-mini-2024…")."""
    if model in prices:
        return prices[model]
    family = [name for name in prices if model.startswith(name + "-")]
    return prices[max(family, key=len)] if family else None


def cost_usd(usage: Usage, price: Price) -> Decimal:
    """USD of one call: uncached input, cached input and output at their prices."""
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    return (Decimal(usage.prompt_tokens - cached) * price.input + Decimal(cached) * price.cached_input
            + Decimal(usage.completion_tokens) * price.output) / MILLION


def usd_text(value: Decimal) -> str:
    """A Decimal as the journal and status show money: plain digits, no exponent."""
    return format(value.normalize() if value else Decimal(0), "f")


# --------------------------------------------------------------------------- journal side

def add_to_ledger(db: Any, day: str, model: str, *, n_sms: int, repeated_sms: int, usage: Usage,
                  cost: Decimal, repeated_usd: Decimal, unpriced: bool) -> None:
    """Add one answered call to the ledger row (day, model), inside the caller's transaction."""
    # Money is summed here in Decimal: SQLite's SUM() of text would go through a float.
    row = db.execute("SELECT cost_usd, repeated_usd FROM ledger WHERE day = ? AND model = ?",
                     [day, model]).fetchone()
    old_cost, old_repeated = (Decimal(row[0]), Decimal(row[1])) if row else (Decimal(0), Decimal(0))
    free = model in FREE_MODELS
    db.execute("INSERT INTO ledger (day, model) VALUES (?, ?) ON CONFLICT (day, model) DO NOTHING",
               [day, model])
    db.execute(
        "UPDATE ledger SET calls = calls + ?, sms = sms + ?, prompt_tokens = prompt_tokens + ?,"
        " cached_tokens = cached_tokens + ?, completion_tokens = completion_tokens + ?,"
        " cost_usd = ?, repeated_calls = repeated_calls + ?, repeated_sms = repeated_sms + ?,"
        " repeated_usd = ?, unpriced_calls = unpriced_calls + ?, rev = rev + 1"
        " WHERE day = ? AND model = ?",
        [0 if free else 1, n_sms, usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens,
         usd_text(old_cost + cost), 1 if repeated_sms and not free else 0, 0 if free else repeated_sms,
         usd_text(old_repeated + repeated_usd), 1 if unpriced and not free else 0, day, model])


def ledger_stats(rows: Iterable[Mapping[str, Any]]) -> dict:
    """One journal's bill (for ``smsctl status``): sums of its ledger rows, money as strings."""
    cost = repeated = Decimal(0)
    paid_sms = free_sms = hits = unpriced = cached = races = 0
    for r in rows:
        races += int(r["cache_races"])
        cost += Decimal(r["cost_usd"])
        repeated += Decimal(r["repeated_usd"])
        cached += int(r["cached_tokens"])
        unpriced += int(r["unpriced_calls"])
        if r["model"] in FREE_MODELS:
            free_sms += int(r["sms"])
            hits += int(r["sms"]) if r["model"] == "cache" else 0
        else:
            paid_sms += int(r["sms"])
    return {"cost_usd": usd_text(cost), "repeated_usd": usd_text(repeated), "cached_tokens": cached,
            "paid_sms": paid_sms, "free_sms": free_sms, "cache_hits": hits, "unpriced_calls": unpriced,
            "cache_races": races}


def totals(per_user: Mapping[str, Mapping[str, Any]]) -> tuple[dict, dict[str, dict]]:
    """The host's bill and each user's, from their journals' :func:`ledger_stats`.

    ``saved_usd``: SMS answered by the rules or the cache, priced at the host's
    average USD per SMS of the paid calls (0 before any paid call).
    """
    cost = repeated = Decimal(0)
    paid = free = hits = cached = unpriced = races = 0
    for s in per_user.values():
        races += int(s.get("cache_races") or 0)
        cost += Decimal(s.get("cost_usd") or 0)
        repeated += Decimal(s.get("repeated_usd") or 0)
        paid += int(s.get("paid_sms") or 0)
        free += int(s.get("free_sms") or 0)
        hits += int(s.get("cache_hits") or 0)
        cached += int(s.get("cached_tokens") or 0)
        unpriced += int(s.get("unpriced_calls") or 0)
    per_sms = cost / paid if paid else Decimal(0)
    users = {u: {"cost_usd": usd_text(Decimal(s.get("cost_usd") or 0)),
                 "repeated_usd": usd_text(Decimal(s.get("repeated_usd") or 0)),
                 "saved_usd": usd_text(per_sms * int(s.get("free_sms") or 0)),
                 "cache_hits": int(s.get("cache_hits") or 0)}
             for u, s in per_user.items()}
    host = {"cost_usd": usd_text(cost), "repeated_usd": usd_text(repeated),
            "saved_usd": usd_text(per_sms * free), "cache_hits": hits, "cached_tokens": cached,
            "unpriced_calls": unpriced, "cache_races": races}
    return host, users


# --------------------------------------------------------------------------- MongoDB side

def cost_doc_id(user_id: str, day: str, model: str) -> str:
    """``_id`` of a :data:`COSTS_COLLECTION` document."""
    return f"{user_id}|{day}|{model}"


def sync_costs(collection: Any, user_id: str, rows: list[dict]) -> None:
    """Write journal ledger rows to MongoDB, idempotently: every total moves with ``$max``.

    The journal's totals only grow, so a replay, a late write or two writers
    can only leave the largest (the latest) total, never a sum counted twice.
    """
    from .store_errors import bulk_created   # pymongo: not for the config's price table
    ops = cost_ops(user_id, rows)
    if ops:
        bulk_created(collection, ops)


def cost_ops(user_id: str, rows: list[dict]) -> list:
    """The ``$max`` upserts of :func:`sync_costs`, one per ledger row.

    A row this journal never wrote to MongoDB (``synced_rev`` 0: the user's first
    calls of a day and model here) is most likely a new document: an insert, and
    the upsert only where it exists (:class:`smsd.store_errors.InsertElse`)."""
    from pymongo import UpdateOne

    from .store_errors import InsertElse
    ops: list = []
    for r in rows:
        flt = {"_id": cost_doc_id(user_id, r["day"], r["model"])}
        update = {
            "$setOnInsert": {"user_id": user_id, "day": r["day"], "model": r["model"]},
            "$max": {"calls": int(r["calls"]), "sms": int(r["sms"]), "cache_races": int(r["cache_races"]),
                     "prompt_tokens": int(r["prompt_tokens"]), "cached_tokens": int(r["cached_tokens"]),
                     "completion_tokens": int(r["completion_tokens"]),
                     "repeated_calls": int(r["repeated_calls"]), "repeated_sms": int(r["repeated_sms"]),
                     "unpriced_calls": int(r["unpriced_calls"]),
                     "cost_usd": Decimal128(Decimal(r["cost_usd"])),
                     "repeated_usd": Decimal128(Decimal(r["repeated_usd"]))}}
        new = not int(r.get("synced_rev") or 0)
        ops.append(InsertElse.of_upsert(flt, update) if new else UpdateOne(flt, update, upsert=True))
    return ops


def write_costs(store: Any, user_id: str, rows: list[dict]) -> None:
    """The journal's ledger rows of ``user_id`` into :data:`COSTS_COLLECTION` (``$max``, idempotent)."""
    ops = cost_ops(user_id, rows)
    if ops:   # through the store: a group turn's members write theirs in one command
        store.bulk_upsert(COSTS_COLLECTION, ops, what="write_costs")
