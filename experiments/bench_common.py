"""Shared by the benchmark scripts: writing a script's own section of docs/benchmarks.md."""

import os

from qinco_jax.data import atomic_write


def write_section(path: str, block: str, start: str, end: str) -> None:
  """Replaces the text from marker `start` to marker `end` (inclusive) in `path` with
  `block` (which carries the markers), appends it when absent, or creates the file;
  the rest of the document is kept and the file is written atomically."""
  block = block.strip("\n")
  text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
  i, j = text.find(start), text.find(end)
  if i >= 0 and j > i:
    text = text[:i] + block + text[j + len(end):]
  else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic_write(path, lambda f: f.write(text.encode()))
