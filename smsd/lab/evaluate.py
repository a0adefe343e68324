"""Score an extractor against labelled SMS fixtures (``smsd evaluate``).

Each line of the data file is a fixture ``{"id", "text", "sender",
"expected"}`` whose ``expected`` is an answer in the contract's format.  The
headline is the share of SMS whose kind, and whose transactions' direction,
amount (compared as numbers) and currency, all match.  The optional fields
get precision and recall (a fixture with ``labelled`` is compared on those
parts only):

* predicted non-null and equal to expected → true positive;
* predicted non-null and different → false positive (and a false negative
  too when something was expected);
* predicted null where something was expected → false negative.

Only fixture ids are printed, never SMS texts.
"""
from __future__ import annotations

import argparse
import json
import sys
from decimal import Decimal, InvalidOperation
from itertools import zip_longest
from pathlib import Path
from typing import Any, Callable

from smsd import rules

Extractor = Callable[..., Any]

#: Default data file, relative to the working directory or the source tree.
DEFAULT_DATA = Path("tests/data/sms_fixtures.jsonl")
HEADLINE_PARTS = ("kind", "direction", "amount", "currency")
SCORED_FIELDS = ("channel", "account_mask", "card_mask", "counterparty", "reference",
                 "balance", "occurred_at", "bank")
#: Fields compared as numbers rather than as strings.
_NUMERIC = {"amount", "balance"}


def _default_data() -> Path:
    """tests/data/... from the working directory, else from the source tree,
    else the copy shipped in the package (smsd/data/) when installed."""
    here = Path(__file__).resolve().parent
    for candidate in (DEFAULT_DATA, here.parent.parent / DEFAULT_DATA, here / "data" / DEFAULT_DATA.name):
        if candidate.exists():
            return candidate
    return DEFAULT_DATA


def _load(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def _decimal(value: Any) -> Decimal | None:
    if value is None:
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return None


def _same(name: str, got: Any, want: Any) -> bool:
    if name in _NUMERIC and got is not None and want is not None:
        a, b = _decimal(got), _decimal(want)
        return a is not None and a == b
    return got == want


def _txns(answer: Any) -> list[dict]:
    txns = answer.get("transactions") if isinstance(answer, dict) else None
    return [t if isinstance(t, dict) else {} for t in txns] if isinstance(txns, list) else []


def _part_matches(name: str, got: dict, want: dict, labelled: list[str] | None = None) -> bool:
    """One headline component of one SMS: kind, or the field over all transactions.
    A part the fixture does not label (``labelled`` given, name not in it) matches."""
    if labelled is not None and name != "kind" and name not in labelled:
        return _part_matches("kind", got, want) and len(_txns(got)) == len(_txns(want))
    if name == "kind":
        return isinstance(got, dict) and got.get("kind") == want.get("kind")
    pairs = list(zip_longest(_txns(got), _txns(want)))
    return all(g is not None and w is not None and _same(name, g.get(name), w.get(name))
               for g, w in pairs)


def _headline(got: dict, want: dict, labelled: list[str] | None = None) -> bool:
    return all(_part_matches(p, got, want, labelled) for p in HEADLINE_PARTS)


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def evaluate(path: Path | None = None, extractor: Extractor = rules.extract, *,
             certain_extractor: Extractor | None = None,
             answer_all: Callable[[list[dict]], list[dict]] | None = None) -> dict:
    """Score ``extractor(text, sender)`` on every fixture in ``path``.

    ``answer_all(rows)``, when given, answers every row at once instead (the
    LLM extractors ask in batches: :class:`smsd.lab.evaluate_llm.Answers`).

    Returns a JSON-ready dict: ``total``, ``headline`` (matched, total,
    rate), ``accuracy`` per headline component, ``fields`` (tp, fp, fn,
    precision, recall per optional field), ``by_bank`` (headline per bank,
    the bank being the fixture id's first segment), ``failing`` (ids that
    miss the headline) and ``errors`` (ids where the extractor raised).
    With ``certain_extractor`` (e.g. :func:`rules.extract_certain`) it adds
    ``certain``: how many SMS it answered and how many of those were right.
    """
    path = Path(path) if path is not None else _default_data()
    rows = _load(path)
    parts = {p: 0 for p in HEADLINE_PARTS}
    fields = {f: {"tp": 0, "fp": 0, "fn": 0} for f in SCORED_FIELDS}
    by_bank: dict[str, dict] = {}
    failing: list[str] = []
    errors: list[str] = []
    matched = 0
    certain = {"answered": 0, "correct": 0, "wrong": []}
    given = answer_all(rows) if answer_all is not None else None

    for n, row in enumerate(rows):
        fid = str(row.get("id"))
        want = row["expected"]
        # A fixture from a source that asserts only some parts lists them in "labelled".
        labelled = row.get("labelled")
        try:
            got = given[n] if given is not None else extractor(row["text"], row.get("sender"))
        except Exception:  # a crashing extractor scores as "found nothing"
            errors.append(fid)
            got = {"kind": None, "transactions": []}
        for p in HEADLINE_PARTS:
            parts[p] += _part_matches(p, got, want, labelled)
        ok = _headline(got, want, labelled)
        matched += ok
        if not ok:
            failing.append(fid)
        bank = fid.split("/", 1)[0]
        stats = by_bank.setdefault(bank, {"matched": 0, "total": 0})
        stats["total"] += 1
        stats["matched"] += ok

        for g, w in zip_longest(_txns(got), _txns(want)):
            g, w = g or {}, w or {}
            for f in SCORED_FIELDS:
                if labelled is not None and f not in labelled:
                    continue
                gv, wv = g.get(f), w.get(f)
                if gv is not None and _same(f, gv, wv):
                    fields[f]["tp"] += 1
                elif gv is not None:
                    fields[f]["fp"] += 1
                    fields[f]["fn"] += wv is not None
                elif wv is not None:
                    fields[f]["fn"] += 1

        if certain_extractor is not None:
            answer = certain_extractor(row["text"], row.get("sender"))
            if answer is not None:
                certain["answered"] += 1
                if _headline(answer, want, labelled):
                    certain["correct"] += 1
                else:
                    certain["wrong"].append(fid)

    total = len(rows)
    for stats in fields.values():
        stats["precision"] = _rate(stats["tp"], stats["tp"] + stats["fp"])
        stats["recall"] = _rate(stats["tp"], stats["tp"] + stats["fn"])
    for stats in by_bank.values():
        stats["rate"] = _rate(stats["matched"], stats["total"])
    result = {
        "data": str(path),
        "total": total,
        "headline": {"matched": matched, "total": total, "rate": _rate(matched, total)},
        "accuracy": {p: _rate(n, total) for p, n in parts.items()},
        "fields": fields,
        "by_bank": dict(sorted(by_bank.items())),
        "failing": failing,
        "errors": errors,
    }
    if certain_extractor is not None:
        certain["coverage"] = _rate(certain["answered"], total)
        certain["precision"] = _rate(certain["correct"], certain["answered"])
        result["certain"] = certain
    return result


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Plain text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def format_report(result: dict) -> str:
    """The human-readable report of :func:`evaluate`'s result."""
    total = result["total"]
    head = result["headline"]
    lines = [f"data: {result['data']} ({total} SMS)", "",
             f"headline (kind + direction + amount + currency): "
             f"{head['matched']}/{total}  {_pct(head['rate'])}", ""]
    lines.append(_table(["component", "rate"],
                        [[p, _pct(r)] for p, r in result["accuracy"].items()]))
    lines.append("")
    lines.append(_table(
        ["field", "TP", "FP", "FN", "precision", "recall"],
        [[f, str(s["tp"]), str(s["fp"]), str(s["fn"]), _pct(s["precision"]), _pct(s["recall"])]
         for f, s in result["fields"].items()]))
    lines.append("")
    lines.append(_table(
        ["bank", "SMS", "exact", "rate"],
        [[b, str(s["total"]), str(s["matched"]), _pct(s["rate"])]
         for b, s in result["by_bank"].items()]))
    if "certain" in result:
        c = result["certain"]
        lines += ["", f"extract_certain: answered {c['answered']}/{total} ({_pct(c['coverage'])}), "
                      f"correct {c['correct']}/{c['answered']} ({_pct(c['precision'])})"]
        if c["wrong"]:
            lines.append("  wrong: " + ", ".join(c["wrong"]))
    lines += ["", "failing: " + (", ".join(result["failing"]) or "none")]
    if result["errors"]:
        lines.append("extractor raised on: " + ", ".join(result["errors"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``smsd evaluate [--extractor rules|llm|rules-then-llm] [--data FILE] [--config FILE] [--json]``."""
    from smsd.config import ConfigError, load_settings

    from . import evaluate_llm
    parser = argparse.ArgumentParser(
        prog="smsd evaluate",
        description="Score an extractor on labelled SMS: what smsd would store (validated and "
                    "grounded), accuracy per field, and for the LLM tokens and USD per 1,000 SMS.")
    parser.add_argument("--extractor", choices=evaluate_llm.EXTRACTORS, default="rules",
                        help="rules (offline, default), llm (the configured endpoint), or rules-then-llm")
    parser.add_argument("--data", type=Path, default=None,
                        help=f"fixture file (JSON lines; default {DEFAULT_DATA})")
    parser.add_argument("--config", type=Path, default=None,
                        help="config.toml for the LLM endpoint and prices (default: $SMSD_CONFIG, ./config.toml)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    path = args.data if args.data is not None else _default_data()
    if not path.is_file():
        print(f"smsd evaluate: no such file: {path}", file=sys.stderr)
        return 2
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"smsd evaluate: {exc}", file=sys.stderr)
        return 78
    client = None
    if args.extractor != "rules":
        from smsd.llm import LlmClient
        llm = settings.llm
        # The daemon's own client, so the prompt, schema, validation and retries are the same.
        client = LlmClient(base_url=llm.base_url, api_key=llm.api_key, model=llm.model,
                           timeout=llm.timeout, max_retries=llm.max_retries,
                           backoff_base=llm.backoff_base, backoff_max=llm.backoff_max,
                           strict_schema=llm.strict_schema, short_ids=llm.short_ids,
                           key_header=llm.key_header)
    answers = evaluate_llm.Answers(args.extractor, settings, client)
    try:
        result = evaluate(path, answer_all=answers,
                          certain_extractor=None if args.extractor == "llm" else rules.extract_certain)
    finally:
        if client is not None:
            client.close()
    result["extractor"] = args.extractor
    result["cost"] = answers.cost.to_dict()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_report(result))
        print()
        print(evaluate_llm.format_cost(args.extractor, answers.cost, evaluate_llm.describe(client)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
