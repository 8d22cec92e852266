"""Lint as part of the suite: ruff's checks (E, F, I001, UP, line length 88, from
`pyproject.toml`) and its formatting, on the package, the tests, the benchmarks and
the examples."""

import pathlib
import subprocess
import sys


ROOT = pathlib.Path(__file__).resolve().parents[1]
PATHS = ["adapters", "tests", "benchmarks", "examples"]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, *PATHS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ruff_check():
    result = _ruff("check", "--no-cache", "--output-format", "concise")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format():
    result = _ruff("format", "--no-cache", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
