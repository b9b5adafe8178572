"""CI never passes over a missing piece: in CI (CI=true) a skipped test fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def run_skipping_test(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess:
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n\ndef test_needs_a_tool():\n    pytest.skip('frobnicator not installed')\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(TESTS) + os.pathsep + env.get("PYTHONPATH", "")
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           str(tmp_path / "test_skips.py")], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)


def test_a_skip_fails_in_ci_and_says_what_was_missing(tmp_path):
    local = run_skipping_test(tmp_path, ci=False)
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout
    ci = run_skipping_test(tmp_path, ci=True)
    assert ci.returncode == 1 and "1 failed" in ci.stdout, ci.stdout
    assert "skipped in CI, where nothing may be missing: frobnicator not installed" in ci.stdout
