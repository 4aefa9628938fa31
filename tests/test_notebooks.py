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


def _repository() -> str:
  import tomllib
  with open(pathlib.Path(__file__).parent.parent / "pyproject.toml", "rb") as f:
    return tomllib.load(f)["project"]["urls"]["Repository"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_colab_badge_and_install_follow_the_repository_url(path):
  repo = _repository()  # https://github.com/OWNER/NAME
  assert repo.startswith("https://github.com/") and repo.count("/") == 4
  text = path.with_suffix(".md").read_text()
  badge = (f"https://colab.research.google.com/github/{repo[len('https://github.com/'):]}"
           f"/blob/main/notebooks/{path.name}")
  assert badge in text
  assert '"google.colab" in sys.modules' in text
  assert f'os.environ.get("QINCO_JAX_REPO", "{repo}")' in text  # forks override it
  assert "git+{repo}" in text
  assert text.count("github.com/") == 1  # no other address to drift


def test_readme_install_line_follows_the_repository_url():
  readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  assert f'@ git+{_repository()}"' in readme


def _readme_python() -> str:
  readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
  return "\n".join(block.split("```", 1)[0] for block in readme.split("```python\n")[1:])


def test_readme_snippets_can_run_again_in_the_same_folder():
  """Every training in the README's snippets resumes (a second run of a snippet
  continues or reloads its run instead of stopping at the workdir's checkpoint)."""
  import re
  code = _readme_python()
  calls = re.findall(r"train_and_evaluate\((.*?)\)\s*(?:#|\n)", code, flags=re.S)
  assert calls and all("resume=True" in call for call in calls), calls


def test_what_readme_snippets_write_is_ignored_by_git():
  """The paths the README's snippets save to (workdirs, codecs, indexes, exports)
  are in .gitignore, so following the README leaves `git status` clean."""
  import re
  import subprocess
  root = pathlib.Path(__file__).parent.parent
  code = _readme_python()
  written = set(re.findall(r'(?:save|export_npz\(codec,|workdir=)\s*\(?\s*"([^"]+)"', code))
  written |= set(re.findall(r'train_and_evaluate\([^)]*?"(runs/[^"]+)"', code))
  assert {"my_codec", "my_index", "codec.npz", "runs/quick", "runs/ivf"} <= written, written
  r = subprocess.run(["git", "check-ignore", "--no-index", *sorted(written)], cwd=root,
                     capture_output=True, text=True)
  assert sorted(r.stdout.split()) == sorted(written), (written, r.stdout, r.stderr)
