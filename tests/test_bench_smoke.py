"""Smoke run of the benchmark command (bench/run_bench.py): it must start everything, drive wrk and print its table.

Figures are not checked: they depend on the machine. Only that the harness works and that, under load, every
message was answered exactly once (the command exits 1 otherwise).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("wrk") is None,
                    reason="the benchmark's load generator wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
def test_quick_benchmark_prints_its_table() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.run_bench", "--quick", "--skip-baseline"], cwd=REPO,
                            capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "| Run | Measure | Result | Target | Verdict |" in result.stdout, output[-4000:]
    for run in ("| 1 |", "| 2 |", "| 3 |", "| 4 |"):
        assert run in result.stdout, f"no {run} row:\n{result.stdout[-4000:]}"
    assert "answered once, 0 duplicated, 0 unanswered, 0 unexpected" in result.stdout
