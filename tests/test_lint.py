"""The code passes the linter configured in pyproject.toml ([tool.ruff]): unused
imports and variables, undefined names, import order, modern syntax, likely bugs; and
the package passes the type checker configured there ([tool.mypy])."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_finds_nothing():
  ruff = shutil.which("ruff")
  if ruff is None:
    try:
      import ruff as _ruff  # noqa: F401  (the pip package ships the binary)
    except ImportError:
      pytest.fail("ruff is not installed: pip install -r requirements.txt")
    cmd = [sys.executable, "-m", "ruff"]
  else:
    cmd = [ruff]
  r = subprocess.run([*cmd, "check", "--no-cache", "qinco_jax", "experiments", "tests",
                      "notebooks"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_mypy_finds_nothing(tmp_path):
  try:
    import mypy  # noqa: F401
  except ImportError:
    pytest.fail("mypy is not installed: pip install -r requirements.txt")
  # No arguments: the files and options come from [tool.mypy]; the cache goes to tmp.
  r = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")],
                     cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
