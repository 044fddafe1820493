"""The benchmark scripts import and parse their options (they are run by hand, not in CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", ["served_vs_bare.py", "bench_segment_cli.py"])
def test_bench_script_starts_and_documents_its_options(script: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--repository" in done.stdout and "--model" in done.stdout
