"""The demo's set-up: a fresh work directory, its config.toml and the seeded SMS.

Labelled fixture SMS, synthetic OTP and promotion texts and malformed
documents are built with their expected answers and inserted through a
short-lived embedded server on the storage and port ``smsd run`` will use.
Apart from :mod:`smsd.lab.demo` because it runs before any daemon process.
"""
from __future__ import annotations

import json
import random
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ..ledger import DEFAULT_PRICES
from .demo_plan import DB_NAME, DemoFailed, Plan, Seeded

MARKER = ".smsd-demo"
DATA_FILE = Path(__file__).resolve().parent / "data" / "sms_fixtures.jsonl"
SYNTHETIC_SENDER = "AX-DEMOBK"
OTHER = {"kind": "other", "transactions": []}

#: Synthetic texts that are not transactions (and carry amounts to tempt an extractor).
SYNTHETIC: tuple[tuple[str, str], ...] = (
    ("otp", "{code} is your OTP for login to NetBanking. Valid for 5 minutes. "
            "Do not share it with anyone. - Demo Bank"),
    ("otp", "Use OTP {code} to authorise a payment of Rs {amount} at DEMO STORE on your card "
            "XX{mask}. Never share your OTP."),
    ("otp", "Your OTP for adding a beneficiary is {code}. If not initiated by you, "
            "call 1800-000-0000."),
    ("promotion", "Get up to 20% cashback on your next 3 UPI payments above Rs 500! "
                  "Offer valid till 31 Jan. T&C apply."),
    ("promotion", "Pre-approved personal loan of Rs 5,00,000 at 10.5% p.a. is waiting for you. "
                  "Apply now in 2 minutes."),
)


def prepare_workdir(workdir: Path) -> None:
    """Wipe ``workdir`` for a fresh demo; refuse a non-empty directory the demo did not make."""
    if workdir.exists():
        if not workdir.is_dir():
            raise DemoFailed(f"{workdir} exists and is not a directory")
        if any(workdir.iterdir()) and not (workdir / MARKER).exists():
            raise DemoFailed(f"{workdir} is not empty and was not made by smsd demo: "
                             "not wiping it; choose another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("made by `smsd demo`; wiped at the start of every demo\n")


def write_config(plan: Plan, mongo_port: int) -> None:
    """The demo's config.toml: embedded MongoDB, everything under the work directory."""
    conf: dict[str, dict[str, Any]] = {
        "mongo": {"uri": "embedded", "db": DB_NAME, "embedded_path": str(plan.mongo_path),
                  "embedded_port": mongo_port, "timeout_ms": 2000},
        "llm": {"extractor": "llm", "base_url": plan.base_url, "model": plan.model,
                "key_header": not plan.real_llm,   # lab server only: per-SMS counters
                "batch_size": plan.batch_size, "concurrency": plan.concurrency,
                "timeout": 60.0 if plan.real_llm else 10.0, "max_retries": 3,
                "backoff_base": 0.2, "backoff_max": 2.0},
        "journal": {"state_dir": str(plan.state_dir)},
        "pipeline": {"max_attempts": 3, "page_size": 50},
        "supervisor": {"runtime_dir": str(plan.runtime_dir), "max_workers": 4,
                       "discovery_interval": 1.0, "restart_backoff": 0.2, "drain_timeout": 20.0,
                       "log_level": "INFO", "metrics_listen": f"127.0.0.1:{plan.metrics_port}"},
    }
    if not plan.real_llm:
        # The local server's answers are billed at gpt-4o-mini's list prices, so the
        # demo's summary shows what the same tokens would cost there.
        mini = DEFAULT_PRICES["gpt-4o-mini"]
        conf[f'llm.prices."{plan.model}"'] = {"input": str(mini.input), "cached_input": str(mini.cached_input),
                                              "output": str(mini.output)}
    lines = ["# Written by `smsd demo`; wiped with the work directory at the next demo.",
             "# The API key is never in this file (OPENAI_API_KEY)."]
    for section, values in conf.items():
        lines.append(f"\n[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    plan.config.write_text("\n".join(lines) + "\n")


def fixture_lines() -> list[dict]:
    """The labelled fixture SMS (``smsd/data/sms_fixtures.jsonl``)."""
    with open(DATA_FILE, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def build_documents(plan: Plan, seed: int = 7) -> tuple[list[dict], Seeded]:
    """The SMS documents to seed and what each should become."""
    from bson import ObjectId

    rng = random.Random(seed)
    lines = fixture_lines()
    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    docs: list[dict] = []
    seeded = Seeded()
    for u in range(plan.users):
        user_id = f"demo-user-{u + 1:02d}"
        seeded.users.append(user_id)
        for i in range(plan.sms_per_user):
            raw_id = ObjectId()
            doc: dict[str, Any] = {"_id": raw_id, "user_id": user_id,
                                   "received_at": base + timedelta(hours=u, minutes=i),
                                   "isprocessed": False}
            if i % 10 == 9:   # one in ten: an OTP or a promotion, not a transaction
                kind, template = SYNTHETIC[(u + i) % len(SYNTHETIC)]
                doc["body"] = template.format(code=f"{rng.randrange(10**6):06d}",
                                              amount=f"{rng.randrange(100, 9999):,}.00",
                                              mask=f"{rng.randrange(10**4):04d}")
                doc["sender"] = SYNTHETIC_SENDER
                seeded.expected[raw_id] = {"kind": kind, "transactions": []}
                seeded.synthetic += 1
            else:
                line = lines[(u * plan.sms_per_user + i) % len(lines)]
                doc["body"] = line["text"]
                if line.get("sender"):
                    doc["sender"] = line["sender"]
                seeded.expected[raw_id] = line["expected"]
                seeded.fixtures += 1
            docs.append(doc)
    for m in range(plan.malformed):   # no text at all, or only blanks: quarantined, never sent
        raw_id = ObjectId()
        doc = {"_id": raw_id, "user_id": seeded.users[m % len(seeded.users)],
               "sender": SYNTHETIC_SENDER, "received_at": base, "isprocessed": False}
        if m % 2:
            doc["body"] = "   "
        docs.append(doc)
        seeded.expected[raw_id] = dict(OTHER)
        seeded.malformed.append(raw_id)
    return docs, seeded


def seed_database(plan: Plan, mongo_port: int, docs: list[dict]) -> None:
    """Insert ``docs`` through a short-lived embedded server on smsd's own storage and port.

    ``smsd run`` starts its embedded server itself; seeding first, with the
    same storage directory and port, then stopping, is the simplest way to
    have the SMS there when it does (a journaled write survives the stop).
    """
    import pymongo
    from pymongo.write_concern import WriteConcern

    from ..embedded import EmbeddedMongo

    server = EmbeddedMongo(plan.mongo_path, port=mongo_port,
                           log_path=plan.mongo_path.parent / "embedded-mongo.log")
    try:
        uri = server.start()
        client = pymongo.MongoClient(uri, directConnection=True, serverSelectionTimeoutMS=5000)
        try:
            coll = client[DB_NAME].get_collection("sms_fin_rawdata",
                                                  write_concern=WriteConcern(w="majority", j=True))
            coll.insert_many(docs, ordered=False)
        finally:
            client.close()
    finally:
        server.stop()
