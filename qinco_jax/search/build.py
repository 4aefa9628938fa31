"""Build stage, the lists: a database's codes streamed from shard files into one list
file on disk, with memory bounded by one shard, never by the database.

faiss's billion-scale recipe, with our lists: each shard becomes a small sorted list
file of its own (a "run": its rows sorted by list, O(shard rows) memory), then all
runs, and the lists of an index built earlier when adding to it, are merged into one
file by one sequential pass over each (`listfile.merge_lists`, O(BLOCK_ROWS + nlist)
memory per input). Runs are kept in a scratch directory until the merge is done, so
a build killed half way redoes only the shards whose runs are missing. More than
MERGE_FANIN inputs are merged in rounds, so that the per-input list sizes held in
memory stay bounded at 2^20 lists. `remove_ids` shrinks lists larger than memory the
same way: one sequential pass writing a new file without the removed rows.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from qinco_jax.search import listfile
from qinco_jax.search.fastscan import Lists, open_lists
from qinco_jax.search.lists import LISTS_FILE, check_codes, check_ids, removal_ids

MERGE_FANIN = 16  # list files merged in one pass
# A shard for the build: a key naming its content (runs are reused under it) and a
# function yielding its (codes (n, M + 1) int, ids (n,) int64) chunks.
Shard = tuple[str, Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]]


def write_run(path: Path, ivf: Lists, chunks: Iterable[tuple[np.ndarray, np.ndarray]],
              bar=None) -> dict:
  """One shard's rows as a sorted list file (norm codes computed). Returns its record:
  rows written and the largest id (-1 if none)."""
  lists, packed, ids = [], [], []
  for codes, cid in chunks:
    codes = check_codes(codes, ivf.M, ivf.nlist, K=ivf.K)
    cid = check_ids(cid, len(codes))
    lists.append(codes[:, 0].astype(np.int32))
    packed.append(ivf.list_codes(codes))
    ids.append(cid)
    if bar is not None:
      bar.update(len(codes))
  all_ids = np.concatenate(ids or [np.zeros(0, np.int64)])
  listfile.write_lists(path, ivf.nlist, np.concatenate(lists or [np.zeros(0, np.int32)]),
                       np.concatenate(packed or [np.zeros((0, ivf.code_size), np.uint8)]),
                       all_ids)
  return {"rows": len(all_ids), "max_id": int(all_ids.max()) if len(all_ids) else -1}


def merge(out: Path, inputs: list, scratch: Path, verbose: bool = False) -> np.ndarray:
  """Merges list files into `out` (in rounds of MERGE_FANIN); returns the sizes."""
  total = sum(listfile.ListFile(p).ntotal for p in inputs)
  with tqdm(total=total, desc="build: merge", unit="vec", unit_scale=True,
            disable=not verbose) as bar:
    level = 0
    while len(inputs) > MERGE_FANIN:
      groups = [inputs[i:i + MERGE_FANIN] for i in range(0, len(inputs), MERGE_FANIN)]
      nxt = []
      for g, group in enumerate(groups):
        p = scratch / f"merge{level}.{g:05d}.faiss"
        listfile.merge_lists(p, group)
        nxt.append(p)
      inputs, level = nxt, level + 1
    return listfile.merge_lists(out, inputs, on_rows=bar.update)


def build_lists(out_dir: str | os.PathLike, ivf: Lists, shards: list[Shard],
                scratch: str | os.PathLike, verbose: bool = False,
                total_rows: int | None = None) -> Lists:
  """Writes the lists of `ivf` plus every shard's rows to directory `out_dir`
  (`IVFIndex.save`'s layout) and returns them opened (`fastscan.open_lists`:
  memory-mapped 8-bit lists, or 4-bit ones read into memory).

  Args:
    ivf: the (trained) lists to add to: empty, in memory, or opened from disk (its
      list file is merged, not read into memory). Left unchanged.
    shards: (key, chunks) per shard, in id order (`Shard`).
    scratch: a directory for the runs (kept until the merge is done, reused by a rerun
      for every shard whose key is unchanged; removed at the end).
    verbose: progress bars (rows, rate, time left when total_rows, the shards' rows,
      is given).
  """
  out_dir, scratch = Path(out_dir), Path(scratch)
  out_dir.mkdir(parents=True, exist_ok=True)
  scratch.mkdir(parents=True, exist_ok=True)
  inputs: list = []
  if ivf.disk is not None:
    inputs.append(ivf.disk.path)
  elif ivf.ntotal:
    ivf.save(scratch / "base")
    inputs.append(scratch / "base" / LISTS_FILE)
  next_id = ivf.next_id
  done = _read_done(scratch)
  with tqdm(total=total_rows, desc="build: runs", unit="vec", unit_scale=True,
            disable=not verbose) as bar:
    for i, (key, chunks) in enumerate(shards):
      run = scratch / f"run.{i:05d}.faiss"
      rec = done.get(run.name)
      if rec and rec.get("key") == key and run.is_file():
        bar.update(rec["rows"])  # written by an earlier, interrupted build
      else:
        rec = {"key": key, **write_run(run, ivf, chunks(), bar)}
        done[run.name] = rec
        (scratch / "runs.json").write_text(json.dumps(done))
      next_id = max(next_id, rec["max_id"] + 1)
      inputs.append(run)
  merge(out_dir / LISTS_FILE, inputs, scratch, verbose)
  saved_next = ivf.next_id
  ivf.next_id = next_id
  ivf.save_meta(out_dir)
  ivf.next_id = saved_next
  shutil.rmtree(scratch, ignore_errors=True)
  return open_lists(out_dir)


def remove_ids(out_dir: str | os.PathLike, ivf: Lists, ids,
               verbose: bool = False) -> tuple[Lists, int]:
  """The offline compaction of lists larger than memory: writes the lists of `ivf`
  without the rows holding these ids ((n,) integers) to directory `out_dir`
  (`IVFIndex.save`'s layout; it may be where `ivf` was opened from) by one sequential
  pass over its list file (`listfile.filter_lists`: O(BLOCK_ROWS + nlist + n) memory,
  never O(ntotal)). Returns them opened memory-mapped and how many rows were removed.
  `ivf` is left unchanged; its next_id is kept (ids are not handed out again)."""
  ids = removal_ids(ids)
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  if ivf.disk is not None:
    src = ivf.disk.path
  else:
    ivf.save(out_dir)
    src = out_dir / LISTS_FILE
  with tqdm(total=ivf.ntotal, desc="remove_ids: compact", unit="vec", unit_scale=True,
            disable=not verbose) as bar:
    sizes = listfile.filter_lists(out_dir / LISTS_FILE, src, ids, on_rows=bar.update)
  ivf.save_meta(out_dir)
  return open_lists(out_dir), ivf.ntotal - int(sizes.sum())


def _read_done(scratch: Path) -> dict:
  try:
    return json.loads((scratch / "runs.json").read_text())
  except (OSError, ValueError):
    return {}
