"""``batch`` benchmark: the same backfill online and through the Batch API, and with kills.

Three runs of ``smsd once`` on the same corpus, each on its own database:
``--mode online``, ``--mode batch``, and ``--mode batch`` killed
(``SMSD_FAILPOINT``) once at every step of the batch flow and restarted until
done.  From the journals: tokens per SMS; USD per 1,000 SMS at the price
table's prices (the batch run at the table's batch discount); and from the
local server: batches created against batches needed (``ceil(SMS /
llm.batch_max_sms)``) — the "never a second batch for the same SMS" promise
under kills.
"""
from __future__ import annotations

import math
import os
import sqlite3
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

from .harness import Bench, BenchResult, Figure

#: gpt-4o-mini list prices (USD per 1M tokens) and the Batch API's discount, used when
#: the configuration has no price table for the bench's model.
LIST_PRICES = {"input": Decimal("0.15"), "output": Decimal("0.60"), "batch_discount": Decimal("0.5")}
KILL_STEPS = ("batch_before_upload", "batch_after_upload", "batch_after_create", "batch_polling",
              "batch_mid_download", "batch_after_download")


def _tokens(state_dir: Path) -> tuple[int, int]:
    """(prompt, completion) tokens of every answered call in the state dir's journals."""
    prompt = completion = 0
    for path in (state_dir / "journal").glob("*.sqlite"):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            p, c = conn.execute("SELECT COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0)"
                                " FROM calls WHERE state = 'answered'").fetchone()
        finally:
            conn.close()
        prompt, completion = prompt + p, completion + c
    return prompt, completion


def usd_per_1000(prompt: int, completion: int, n_sms: int, *, batch: bool) -> Decimal:
    """USD per 1,000 SMS at :data:`LIST_PRICES` (Decimal, never float)."""
    cost = (Decimal(prompt) * LIST_PRICES["input"] + Decimal(completion) * LIST_PRICES["output"]) / 10**6
    if batch:
        cost *= 1 - LIST_PRICES["batch_discount"]
    return cost * 1000 / max(n_sms, 1)


def _once_env(config: Path, failpoint: str, timeout: float = 300) -> int:
    """``smsd once --resume`` for the bench user, killed at ``failpoint`` ("" = none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSD_")}
    env.update(SMSD_CONFIG=str(config), SMSD_FAILPOINT=failpoint)
    done = subprocess.run([sys.executable, "-m", "smsd.cli", "once", "--user-id", "bench-batch", "--resume"],
                          env=env, cwd=str(config.parent), capture_output=True, timeout=timeout)
    return done.returncode


def bench_batch(bench: Bench) -> BenchResult:
    """Online vs batch cost per 1,000 SMS, and batches created under kills vs needed."""
    res = BenchResult("batch")
    n = 200 if bench.params.runs == 1 else 1000
    batch_max = max(1, n // 2)      # two batches needed: kills land in both
    rows = {}
    for label, mode, kills in (("online", "online", False), ("batch", "batch", False),
                               ("batch, killed at every step", "batch", True)):
        db_name, directory = bench.fresh(label.split(",")[0])
        bench.seed(db_name, "bench-batch", n)
        config = bench.write_config(directory, db_name, llm={"mode": mode, "batch_max_sms": batch_max,
                                                            "batch_poll_interval": 0.5})
        before = bench.llm._admin("GET", "/_admin/batches")["created"]
        kills_done = 0
        if kills:
            for step in KILL_STEPS * 2:   # each step once per batch needed
                if _once_env(config, step) == -9:
                    kills_done += 1
        code = _once_env(config, "")
        created = bench.llm._admin("GET", "/_admin/batches")["created"] - before
        processed = bench.client[db_name]["sms_fin_rawdata"].count_documents(
            {"user_id": "bench-batch", "isprocessed": True})
        prompt, completion = _tokens(directory / "state")
        rows[label] = (usd_per_1000(prompt, completion, n, batch=mode == "batch"), prompt, completion,
                       created, processed, kills_done, code)
        bench.drop(db_name)
    needed = math.ceil(n / batch_max)
    online = rows["online"][0]
    for label, (usd, prompt, completion, created, processed, kills_done, code) in rows.items():
        res.details.append(f"| {label} | {processed}/{n} | {prompt / n:.1f} | {completion / n:.1f} | "
                           f"${usd:.6f} | {created} | {kills_done} | exit {code} |")
    res.details.insert(0, "| run | SMS stored | prompt tok/SMS | completion tok/SMS | USD / 1,000 SMS "
                          "| batches created | kills | last run |")
    res.details.insert(1, "|---|---|---|---|---|---|---|---|")
    batch_usd = rows["batch"][0]
    res.figures.append(Figure("batch", "USD per 1,000 SMS, online (gpt-4o-mini list prices)",
                              float(online), "USD"))
    res.figures.append(Figure("batch", "USD per 1,000 SMS, Batch API", float(batch_usd), "USD"))
    ratio = batch_usd / online if online else None
    res.figures.append(Figure("batch", "Batch API ÷ online, USD per SMS (same corpus)",
                              None if ratio is None else float(ratio), "ratio", target="0.5 (±1 %)",
                              met=ratio is not None and abs(ratio - Decimal("0.5")) <= Decimal("0.005")))
    killed = rows["batch, killed at every step"]
    res.figures.append(Figure("batch", "batches created with kills ÷ batches needed", killed[3] / needed,
                              "ratio", target="= 1", met=killed[3] == needed and killed[4] == n))
    res.notes.append("The ratio is the discount itself when both runs spend the same tokens; the "
                     "local server's token counts differ by a few tokens between the runs.")
    res.notes.append(f"{n} SMS, `llm.batch_max_sms` = {batch_max} ({needed} batches needed), "
                     f"batch_size {bench.params.batch_size}; tokens as the local server counts them "
                     "(one per four characters); prices: gpt-4o-mini list prices "
                     f"(${LIST_PRICES['input']} in, ${LIST_PRICES['output']} out per 1M tokens), "
                     f"Batch API at {LIST_PRICES['batch_discount'] * 100:.0f} % off. The killed run "
                     f"was SIGKILLed {killed[5]} times, at each of {', '.join(KILL_STEPS)}, once per batch.")
    return res
