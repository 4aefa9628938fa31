"""Mutation sweep: puts one small slip at a time into a module and runs the tests that
execute the slipped line; a slip that no test catches ("survivor") marks a gap in the
tests or an equivalent change. A development tool, not part of the suite.

  python -m tests.mutate coverage --tests tests/test_train.py tests/test_codec.py ...
  python -m tests.mutate run qinco_jax/trainer.py [--sample 40 --seed 0] \
      [--only tests/test_train.py ...]
  python -m tests.mutate report [qinco_jax/trainer.py ...]

`coverage` runs the test files once under coverage.py (pip install coverage) with one
context per test, also inside the processes the tests start, and records each test's
duration (merged into earlier runs, so new tests can be measured alone). `run`
mutates a scratch copy of the repository (never this checkout): per slip it runs the
covering tests, fastest first, stopping at the first failure, with a timeout of 3x
their measured time + 60 s (a timeout counts as caught). Results are appended to
`.mutation/results.jsonl`; a slip already there is not run again, except survivors
with --rerun. `report` prints the score per module and the survivors. One sweep at a
time: it is CPU-heavy.

Slips (at every place outside docstrings, messages, asserts, annotations and raise):
  + <-> -, * <-> /, // -> /, ** -> *; <, <=, >, >=, ==, != to their neighbours; and <->
  or; `not x` -> x; x += -> x -=; integer n -> n + 1; float f -> 2f (0.0 -> 1.0); True
  <-> False; break <-> continue; a call statement -> pass; a call without its last
  keyword argument, or its last positional one where the callee has a default for it.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Coverage data, durations, results (git-ignored; MUTATE_WORK: the checkout's, when the
# coverage run works in a scratch copy).
WORK = Path(os.environ.get("MUTATE_WORK", ROOT / ".mutation"))
SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
        ast.FloorDiv: ast.Div, ast.Pow: ast.Mult, ast.Lt: ast.LtE, ast.LtE: ast.Lt,
        ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
        ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
        ast.And: ast.Or, ast.Or: ast.And}
_SITECUSTOMIZE = '''import atexit, os
if os.environ.get("MUTATE_COVERAGE"):  # child processes of a test (tests/mutate.py)
  import coverage
  _cov = coverage.Coverage(data_file=os.environ["MUTATE_COVERAGE"], data_suffix=True,
                           include=["*/qinco_jax/*"], context=os.environ.get("MUTATE_TEST"))
  _cov.start()
  atexit.register(lambda: (_cov.stop(), _cov.save()))
  _exit = os._exit

  def _save_then_exit(code):  # distributed.exit_on_error leaves through os._exit
    _cov.stop()
    _cov.save()
    _exit(code)
  os._exit = _save_then_exit
'''


# ------------------------------------------------------------------ the slips
# Keyword arguments whose loss only changes what is displayed (not dropped).
_DISPLAY = {None, "stacklevel", "desc", "unit", "leave", "disable", "flush", "file"}


def _name(func: ast.expr) -> str | None:
  return func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)


def _required_positionals() -> dict[str, int]:
  """{function name: positional parameters without a default} over the package: a
  call may lose its last positional argument only where that one has a default."""
  out: dict[str, int] = {}
  for f in (ROOT / "qinco_jax").rglob("*.py"):
    for n in ast.walk(ast.parse(f.read_text())):
      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
        pos = n.args.posonlyargs + n.args.args
        req = len(pos) - len(n.args.defaults) - (1 if pos and pos[0].arg in ("self", "cls")
                                                   else 0)
        out[n.name] = max(out.get(n.name, 0), req)
  return out


_REQUIRED = _required_positionals()
def _skipped(tree: ast.AST) -> set[int]:
  """ids of nodes never mutated: docstrings, messages, asserts, annotations, raise."""
  skip: set[int] = set()

  def drop(n):
    skip.update(id(m) for m in ast.walk(n))

  for n in ast.walk(tree):
    if isinstance(n, (ast.Assert, ast.Raise, ast.JoinedStr, ast.ImportFrom, ast.Import)):
      drop(n)
    elif isinstance(n, ast.AnnAssign):
      drop(n.annotation)
    elif isinstance(n, ast.arg) and n.annotation is not None:
      drop(n.annotation)
    elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
      if n.returns is not None:
        drop(n.returns)
      drop_decorators = n.decorator_list
      for d in drop_decorators:
        drop(d)
    if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body and isinstance(
        n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant):
      drop(n.body[0])
    if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call) and _name(
        n.value.func) in ("print", "set_postfix"):
      drop(n)  # output only
  return skip


def _changes(n: ast.AST):
  """(description, replacement source) of every slip of node n itself."""
  def alt(**kw):
    new = type(n)(**{**{f: getattr(n, f) for f in n._fields}, **kw})
    return ast.unparse(ast.fix_missing_locations(ast.copy_location(new, n)))

  if isinstance(n, ast.BinOp) and type(n.op) in SWAP:
    yield f"{type(n.op).__name__}->{SWAP[type(n.op)].__name__}", alt(op=SWAP[type(n.op)]())
  elif isinstance(n, ast.BoolOp):
    yield f"{type(n.op).__name__}->{SWAP[type(n.op)].__name__}", alt(op=SWAP[type(n.op)]())
  elif isinstance(n, ast.Compare):
    for i, op in enumerate(n.ops):
      if type(op) in SWAP:
        ops = list(n.ops)
        ops[i] = SWAP[type(op)]()
        yield f"{type(op).__name__}->{type(ops[i]).__name__}", alt(ops=ops)
  elif isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not):
    yield "drop not", ast.unparse(n.operand)
  elif isinstance(n, ast.AugAssign) and type(n.op) in SWAP:
    yield f"{type(n.op).__name__}= -> {SWAP[type(n.op)].__name__}=", alt(op=SWAP[type(n.op)]())
  elif isinstance(n, ast.Constant) and type(n.value) is bool:
    yield f"{n.value}->{not n.value}", repr(not n.value)
  elif isinstance(n, ast.Constant) and type(n.value) is int:
    yield f"{n.value}->{n.value + 1}", repr(n.value + 1)
  elif isinstance(n, ast.Constant) and type(n.value) is float:
    v = 2 * n.value if n.value else 1.0
    yield f"{n.value!r}->{v!r}", repr(v)
  elif isinstance(n, (ast.Break, ast.Continue)):
    yield ("break->continue", "continue") if isinstance(n, ast.Break) else (
        "continue->break", "break")
  elif isinstance(n, ast.Expr) and isinstance(n.value, ast.Call):
    yield "call -> pass", "pass"
  if isinstance(n, ast.Call) and n.keywords and n.keywords[-1].arg not in _DISPLAY:
    yield f"drop {n.keywords[-1].arg}=", alt(keywords=n.keywords[:-1])
  elif isinstance(n, ast.Call) and n.args and not isinstance(n.args[-1], ast.Starred) and (
      len(n.args) > _REQUIRED.get(_name(n.func), len(n.args))):
    yield "drop last argument", alt(args=n.args[:-1])


def mutants(path: Path) -> list[dict]:
  """Every slip of a module: {"module", "line", "col", "end", "op", "old", "new", ...}."""
  src = path.read_text()
  tree = ast.parse(src)
  skip = _skipped(tree)
  lines = src.splitlines(keepends=True)
  offsets = [0]
  for line in lines:
    offsets.append(offsets[-1] + len(line.encode()))
  out = []
  for n in ast.walk(tree):
    if id(n) in skip or not hasattr(n, "lineno") or n.end_lineno is None:
      continue
    start = offsets[n.lineno - 1] + n.col_offset
    end = offsets[n.end_lineno - 1] + n.end_col_offset
    old = src.encode()[start:end].decode()
    for op, new in _changes(n):
      if not isinstance(n, ast.stmt):
        new = f"({new})"
      out.append({"module": str(path.relative_to(ROOT)), "line": n.lineno,
                  "col": n.col_offset, "start": start, "end": end, "op": op,
                  "old": old.splitlines()[0][:80], "new": new[:80], "_new": new})
  return sorted(out, key=lambda m: (m["start"], m["op"]))


def apply(src: str, m: dict) -> str:
  b = src.encode()
  return (b[:m["start"]] + m["_new"].encode() + b[m["end"]:]).decode()


# --------------------------------------------------- coverage and test choice
class Plugin:
  """pytest plugin of the coverage run: one context per test (also in child
  processes, through sitecustomize and MUTATE_TEST) and each test's duration."""

  def __init__(self, cov):
    self.cov, self.durations = cov, {}

  def pytest_runtest_setup(self, item):
    os.environ["MUTATE_TEST"] = item.nodeid
    self.cov.switch_context(item.nodeid)

  def pytest_runtest_logreport(self, report):
    self.durations[report.nodeid] = self.durations.get(report.nodeid, 0) + report.duration


def _scratch() -> Path:
  """A copy of the repository's working files (no .git) with the coverage hook."""
  dst = Path(tempfile.mkdtemp(prefix="qj-mutate-")) / "repo"
  shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
      ".git", ".mutation", "__pycache__", "*.egg-info", "build"))
  (dst / "sitecustomize.py").write_text(_SITECUSTOMIZE)
  return dst


def run_coverage(tests: list[str]):
  """Runs `_coverage` in a scratch copy, whose sitecustomize.py measures children."""
  WORK.mkdir(exist_ok=True)
  scratch = _scratch()
  try:
    subprocess.run([sys.executable, "-m", "tests.mutate", "_coverage", "--tests", *tests],
                   cwd=scratch, env={**os.environ, "PYTHONPATH": str(scratch),
                                     "MUTATE_WORK": str(WORK)}, check=True)
  finally:
    shutil.rmtree(scratch.parent, ignore_errors=True)


def _coverage(tests: list[str]):
  import coverage
  import pytest
  data = WORK / "coverage"
  for f in WORK.glob("coverage*"):
    f.unlink()
  os.environ["MUTATE_COVERAGE"] = str(data)
  cov = coverage.Coverage(data_file=str(data), data_suffix=True, include=["*/qinco_jax/*"])
  cov.start()
  plugin = Plugin(cov)
  rc = pytest.main(["-q", "-p", "no:cacheprovider", "-o", "addopts=", *tests],
                   plugins=[plugin])
  cov.stop()
  cov.save()
  combined = coverage.Coverage(data_file=str(data))
  combined.combine([str(WORK)])
  cov_data = combined.get_data()
  old = WORK / "covered.json"  # merged into (new tests, or tests measured again)
  info = json.loads(old.read_text()) if old.exists() else {"lines": {}, "durations": {}}
  for f in cov_data.measured_files():
    rel = "qinco_jax/" + f.split("/qinco_jax/", 1)[1]
    by_line = info["lines"].setdefault(rel, {})
    for k, v in cov_data.contexts_by_lineno(f).items():  # context "": at import
      by_line[str(k)] = sorted(set(by_line.get(str(k), [])) | set(v))
  info["durations"].update(plugin.durations)
  old.write_text(json.dumps(info))
  print(f"coverage of {len(plugin.durations)} tests written ({rc=})")


def covering(m: dict, info: dict) -> list[str]:
  """Tests that run the slipped line, fastest first; for a line run at import (module
  constants, default values), every test that runs any line of the module."""
  by_line = info["lines"].get(m["module"], {})
  tests = set(by_line.get(str(m["line"]), []))
  if "" in tests:  # run at import (a def line's defaults, a constant): any test may see it
    tests = {t for ts in by_line.values() for t in ts}
  tests.discard("")
  return sorted(tests, key=lambda t: info["durations"].get(t, 1e9))


# ---------------------------------------------------------------------- runs
def _done(rerun: bool) -> set[tuple]:
  """Slips with a result (rerun: only the caught ones, so survivors run again)."""
  f = WORK / "results.jsonl"
  if not f.exists():
    return set()
  latest = {(r["module"], r["start"], r["op"]): r["status"]
            for r in map(json.loads, f.read_text().splitlines())}
  return {k for k, v in latest.items() if not rerun or v in ("killed", "timeout")}


def run(modules: list[str], sample: int | None, seed: int, only: list[str],
        rerun: bool = False):
  info = json.loads((WORK / "covered.json").read_text())
  scratch = _scratch()
  env = {**os.environ, "PYTHONPATH": str(scratch), "MUTATE_COVERAGE": "",
         "JAX_COMPILATION_CACHE_DIR": str(WORK / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
  done = _done(rerun)
  for module in modules:
    path = ROOT / module
    todo = mutants(path)
    if sample is not None and sample < len(todo):
      todo = sorted(random.Random(seed).sample(todo, sample), key=lambda m: m["start"])
    src = path.read_text()
    for i, m in enumerate(todo):
      if (m["module"], m["start"], m["op"]) in done:
        continue
      tests = [t for t in covering(m, info) if not only or t.split("::")[0] in only]
      rec = {k: v for k, v in m.items() if not k.startswith("_")}
      t0 = time.monotonic()
      if not tests:
        rec.update(status="not covered", tests=0)
      else:
        (scratch / module).write_text(apply(src, m))
        limit = 3 * sum(info["durations"].get(t, 60) for t in tests) + 60
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               "-o", "addopts=", *tests]
        proc = subprocess.Popen(cmd, cwd=scratch, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
          out, _ = proc.communicate(timeout=limit)
          status = "survived" if proc.returncode == 0 else "killed"
          if proc.returncode not in (0, 1):  # errors, interrupted, no tests collected
            status = "killed" if "error" in out.lower() else f"rc {proc.returncode}"
        except subprocess.TimeoutExpired:
          os.killpg(proc.pid, 9)
          out, _ = proc.communicate()
          status = "timeout"
        finally:
          (scratch / module).write_text(src)
        failed = [ln.split(" ")[1] for ln in out.splitlines() if ln.startswith("FAILED ")]
        rec.update(status=status, tests=len(tests), by=failed[:1])
      rec["seconds"] = round(time.monotonic() - t0, 1)
      with open(WORK / "results.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
      print(f"[{i + 1}/{len(todo)}] {module}:{m['line']} {m['op']}: {rec['status']} "
            f"({rec['seconds']} s)", flush=True)
  shutil.rmtree(scratch.parent, ignore_errors=True)


def report(modules: list[str]):
  rows = [json.loads(s) for s in (WORK / "results.jsonl").read_text().splitlines()]
  latest = {(r["module"], r["start"], r["op"]): r for r in rows}  # reruns replace
  for module in sorted({r["module"] for r in latest.values()}):
    if modules and module not in modules:
      continue
    rs = [r for r in latest.values() if r["module"] == module]
    caught = sum(r["status"] in ("killed", "timeout") for r in rs)
    print(f"{module}: {caught}/{len(rs)} caught ({100 * caught / len(rs):.0f}%), "
          f"{sum(r['status'] == 'timeout' for r in rs)} by timeout, "
          f"{sum(r['status'] == 'not covered' for r in rs)} not covered")
    for r in sorted(rs, key=lambda r: r["start"]):
      if r["status"] not in ("killed", "timeout"):
        print(f"  {r['line']:4d} {r['status']:11s} {r['op']:22s} {r['old']!r} -> {r['new']!r}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("command", choices=["coverage", "_coverage", "run", "report", "list"])
  ap.add_argument("modules", nargs="*")
  ap.add_argument("--tests", nargs="*", default=[])
  ap.add_argument("--sample", type=int, default=None, help="slips per module (default all)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--only", nargs="*", default=[], help="run: only these test files")
  ap.add_argument("--rerun", action="store_true", help="run: survivors again")
  a = ap.parse_args()
  if a.command == "coverage":
    run_coverage(a.tests)
  elif a.command == "_coverage":
    _coverage(a.tests)
  elif a.command == "run":
    run(a.modules, a.sample, a.seed, a.only, a.rerun)
  elif a.command == "report":
    report(a.modules)
  else:
    for module in a.modules:
      ms = mutants(ROOT / module)
      print(f"{module}: {len(ms)} slips")


if __name__ == "__main__":
  main()
