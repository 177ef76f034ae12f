"""Smoke runs of the benchmark commands: bench/run_bench.py must start everything, drive wrk and print its table;
bench/store_bench.py must drive one reply's store calls on both backends.

Figures are not checked: they depend on the machine. Only that the harness works and that, under load, every
message was answered exactly once (the command exits 1 otherwise).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("wrk") is None,
                    reason="the benchmark's load generator wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
def test_quick_benchmark_prints_its_table(tmp_path: Path) -> None:
    figures = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "bench.run_bench", "--quick", "--skip-baseline",
                             "--json", str(figures)], cwd=REPO, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "| Run | Measure | Result | Target | Verdict |" in result.stdout, output[-4000:]
    for run in ("| 1 |", "| 2 |", "| 3 |", "| 4 |", "| 5a |", "| 5b |"):
        assert run in result.stdout, f"no {run} row:\n{result.stdout[-4000:]}"
    assert "answered once, 0 duplicated, 0 unanswered, 0 unexpected" in result.stdout
    # Run 5: every single message got its own delay (its sendText matched to it), with and without debounce.
    data = json.loads(figures.read_text())["data"]
    for key in ("run5a", "run5b"):
        assert len(data[key]["delays_ms"]) == data[key]["messages"] > 0, data[key]
        assert data[key]["check"]["answered_once"] == data[key]["messages"], data[key]
    assert data["run5b"]["window_s"] > 0 and data["run5a"]["window_s"] == 0


def test_the_store_benchmark_drives_a_reply_through_each_backend() -> None:
    """bench/store_bench.py: accept, claim, begin_send and finish on SQLite and PostgreSQL (it raises if the store
    loses a message or refuses a finish), one line of per-call figures each."""
    result = subprocess.run([sys.executable, "-m", "bench.store_bench", "--messages", "40", "--rounds", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    if result.returncode == 1 and "PostgreSQL: not measured" in output:
        from tests import postgres

        postgres.unavailable(output.strip().splitlines()[-1])  # skips, or fails under CI=true
    assert result.returncode == 0, output[-4000:]
    for store in ("SQLite", "PostgreSQL"):
        line = next((line for line in result.stdout.splitlines() if line.startswith(store)), "")
        assert all(call in line for call in ("accept", "claim_due", "begin_send", "finish", "one reply")), output
