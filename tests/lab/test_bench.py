"""``smsd bench`` runs and reports figures (behaviour only: speed is never asserted here)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_quick_journal_bench_runs_and_reports_positive_figures(tmp_path):
    out_json = tmp_path / "bench.json"
    report = tmp_path / "BENCHMARKS.md"
    done = subprocess.run(
        [sys.executable, "-m", "smsd.cli", "bench", "--quick", "--only", "journal",
         "--json", str(out_json), "--out", str(report), "--tmp", str(tmp_path), "--quiet"],
        capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "record_answer commit, synchronous=FULL, median" in done.stdout
    data = json.loads(out_json.read_text())
    [journal] = data["results"]
    assert journal["name"] == "journal" and journal["error"] is None
    values = {f["name"]: f["value"] for f in journal["figures"]}
    assert len(values) >= 4
    assert all(v is not None and v > 0 for v in values.values()), values
    text = report.read_text()
    assert "## Machine" in text and "make bench" in text and "synchronous=NORMAL" in text
    # The bench cleans up after itself: nothing is left in its temporary directory.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("smsd-bench-")]


def test_unknown_benchmark_name_is_a_usage_error():
    done = subprocess.run([sys.executable, "-m", "smsd.cli", "bench", "--only", "nope"],
                          capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert done.returncode == 2
    assert "unknown benchmark" in done.stderr


def _quick_figures(tmp_path, name: str, timeout: float) -> dict:
    """``smsd bench --quick --only NAME``: its figures by name (the bench must report no error)."""
    out_json = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "smsd.cli", "bench", "--quick", "--only", name,
         "--json", str(out_json), "--tmp", str(tmp_path), "--quiet"],
        capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = json.loads(out_json.read_text())["results"]
    assert result["error"] is None, result["error"]
    return {f["name"]: f["value"] for f in result["figures"]}


@pytest.mark.slow
def test_quick_cost_bench_end_to_end_ledger_matches_the_requests_as_built(tmp_path):
    """The cost bench's two halves agree: what the journal's ledger billed for a backfill through
    `smsd once` is what the requests built by LlmClient cost (same tokens, same prices)."""
    values = _quick_figures(tmp_path, "cost", timeout=600)
    assert values["USD per 1,000 SMS end to end, backfill"] == values["USD per 1,000 SMS, backfill, after"] > 0
    assert values["backfill prompt tokens per SMS, after"] < values["backfill prompt tokens per SMS, before"]
    cache_run = next(v for k, v in values.items() if "answer cache on" in k)
    assert 0 < cache_run < values["USD per 1,000 SMS end to end, backfill"]
    # Trickle batching: fewer calls and fewer prompt tokens per SMS than a call per user, same run.
    assert values["trickle under smsd run: LLM calls, grouped / one user per turn"] < 1
    assert (values["trickle under smsd run: prompt tokens per SMS, grouped"]
            < values["trickle under smsd run: prompt tokens per SMS, one user per turn"])


def test_quick_fence_bench_times_every_way_of_writing_a_flush(tmp_path):
    values = _quick_figures(tmp_path, "fence", timeout=180)
    assert len(values) == 5 and all(v is not None and v > 0 for v in values.values()), values
