"""Notebooks: stored without outputs, each paired with an identical jupytext .md twin.

The notebooks themselves are executed by `python -m pytest` through nbmake.
"""

import pathlib

import pytest

jupytext = pytest.importorskip("jupytext")

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
  assert [p.name for p in NOTEBOOKS] == ["quickstart.ipynb", "search.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_without_outputs_and_in_sync(path):
  nb = jupytext.read(path)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, (
          f"{path.name}: clear the outputs before committing")
  twin = path.with_suffix(".md")
  assert twin.is_file(), f"{path.name} has no jupytext twin {twin.name}"
  md = jupytext.read(twin)
  assert [(c.cell_type, c.source) for c in nb.cells] == [
      (c.cell_type, c.source) for c in md.cells], (
          f"{path.name} and {twin.name} differ: run `jupytext --sync {twin}`")
  assert nb.metadata.get("jupytext", {}).get("formats") == "ipynb,md"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_colab_badge_and_guarded_install(path):
  text = path.with_suffix(".md").read_text()
  assert ("https://colab.research.google.com/github/qinco-jax/qinco-jax/blob/main/"
          f"notebooks/{path.name}") in text
  assert '"google.colab" in sys.modules' in text
