"""The package's import layering, read from the source (ast): no cycles, nothing below
the search subpackage imports it, and each search module imports only the ones above
it in the table of `qinco_jax/search/__init__.py`."""

import ast
import pathlib
import re

import qinco_jax.search

PKG = pathlib.Path(__file__).parent.parent / "qinco_jax"
# Above the search subpackage: the package face, the programs and the benchmarks.
ABOVE_SEARCH = ("qinco_jax", "qinco_jax.cli", "qinco_jax.bench")


def _module(path: pathlib.Path) -> str:
  parts = path.relative_to(PKG.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """The qinco_jax modules a file imports (anywhere in it, lazily too)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    names = []
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    for n in names:
      if n in modules:
        out.add(n)
        break
  return out


def _graph() -> dict[str, set[str]]:
  files = {_module(p): p for p in PKG.rglob("*.py")}
  return {m: _imports(p, set(files)) - {m} for m, p in files.items()}


def test_the_import_graph_has_no_cycle():
  graph = _graph()
  state: dict[str, int] = {}

  def visit(m, path):
    if state.get(m) == 1:
      raise AssertionError("import cycle: " + " -> ".join(path + [m]))
    if state.get(m) == 2:
      return
    state[m] = 1
    for d in sorted(graph[m]):
      # A package's __init__ importing its own modules is how it re-exports them.
      if not d.startswith(m + "."):
        visit(d, path + [m])
    state[m] = 2

  for m in sorted(graph):
    visit(m, [])


def test_nothing_below_the_search_subpackage_imports_it():
  for m, deps in _graph().items():
    if m.startswith("qinco_jax.search") or m in ABOVE_SEARCH or m.startswith(
        "qinco_jax.bench."):
      continue
    up = sorted(d for d in deps if d.startswith("qinco_jax.search"))
    assert not up, f"{m} imports {up}, which sits above it"


def test_search_modules_import_only_the_ones_above_them_in_the_table():
  order = re.findall(r"^  (\w+)\.py ", qinco_jax.search.__doc__, re.M)
  files = {p.stem for p in (PKG / "search").glob("*.py")} - {"__init__"}
  assert sorted(order) == sorted(files), "the table must list every search module once"
  rank = {f"qinco_jax.search.{m}": i for i, m in enumerate(order)}
  graph = _graph()
  for m, i in rank.items():
    later = sorted(d for d in graph[m] if rank.get(d, -1) >= i)
    assert not later, f"{m} imports {later}, listed after it"
    assert "qinco_jax.search" not in graph[m], f"{m} imports the package face"
