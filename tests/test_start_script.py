"""start_webhook_server.sh as a new user runs it: the wrong shell, the wrong Python, a broken .venv."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "start_webhook_server.sh"


def run(*command: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    return subprocess.run(command, cwd=REPO, env={**base, **env}, capture_output=True, text=True, timeout=120)


def test_run_with_sh_it_says_to_use_bash() -> None:
    result = run("sh", str(SCRIPT))
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "start_webhook_server.sh needs bash: run ./start_webhook_server.sh or bash start_webhook_server.sh")


def test_an_old_or_missing_python_is_named_with_how_to_choose_another(tmp_path: Path) -> None:
    old = tmp_path / "python3.9"
    old.write_text('#!/bin/sh\n[ "$1" = "--version" ] && echo "Python 3.9.18" && exit 0\nexit 1\n')
    old.chmod(0o755)
    for python, shown in ((str(old), "Python 3.9.18"), (str(tmp_path / "nowhere"), "not found")):
        result = run(str(SCRIPT), "test", PYTHON=python, VENV_DIR=str(tmp_path / "venv"))
        assert result.returncode != 0
        (line,) = result.stderr.strip().splitlines()
        assert f"needs Python 3.11 or newer, but {python} is {shown}" in line and "PYTHON=python3.12" in line
        assert not (tmp_path / "venv").exists()


def test_a_venv_of_another_python_or_left_broken_is_rebuilt_not_reused(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    stale = venv / "bin" / "python"
    stale.write_text('#!/bin/sh\necho "3.9"\n')  # made by another interpreter: reports 3.9, has no pip
    stale.chmod(0o755)
    # No index: the rebuilt venv's install fails at once, offline, after the part this test is about.
    result = run(str(SCRIPT), "test", PYTHON=sys.executable, VENV_DIR=str(venv), PIP_NO_INDEX="1")
    assert f"Rebuilding {venv}: it is broken or was made by another Python" in result.stdout
    assert "Creating virtual environment" in result.stdout
    version = subprocess.run([str(venv / "bin" / "python"), "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True)
    assert version.stdout.strip() == str(sys.version_info[:2])  # a real venv of this Python now
    assert result.returncode != 0  # the install could not reach an index here, and says so
