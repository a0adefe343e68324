"""``smsd bench`` runs and reports figures (behaviour only: speed is never asserted here)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
