"""Static checks of the tree: pyflakes' undefined names, unused imports and variables, and syntax
errors (ruff, configured in pyproject.toml). A name missing on a rarely taken error path is a
NameError a user meets long after the change that made it."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_no_undefined_names_unused_imports_or_syntax_errors():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "launcher", "training", "tests",
                           "benchmarks"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
