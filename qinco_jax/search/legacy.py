"""Indexes saved by earlier versions, read into the current inverted lists: the lists
as one `ivf.npz` of row arrays, and before that a faiss IVF-RQ file (`index.faiss`).
Save them again to skip the conversion."""

from __future__ import annotations

from typing import Any, Literal, cast

import numpy as np

from qinco_jax.search.lists import IVFIndex, build_index

LOAD_ROWS = 1 << 20  # rows widened and checked at a time when reading an ivf.npz


def from_arrays(a) -> IVFIndex:
  """Reads the lists of an index saved as `ivf.npz` (before the list file), into
  memory, LOAD_ROWS rows at a time."""
  import faiss
  metric = cast(Literal["l2", "ip"], str(a["metric"]))
  index = IVFIndex(a["centroids"], a["tables"], a["levels"], metric,
                   coarse=faiss.deserialize_index(np.asarray(a["coarse"])))
  lists, codes, ids = (np.asarray(a[k]) for k in ("lists", "codes", "ids"))
  vcodes = np.asarray(a["vcodes"]) if "vcodes" in a and metric == "l2" else None
  for s in range(0, len(ids), LOAD_ROWS):
    e = s + LOAD_ROWS
    index.add(np.concatenate([lists[s:e, None].astype(np.int64),
                              codes[s:e].astype(np.int64)], 1), ids[s:e],
              vcodes=None if vcodes is None else vcodes[s:e])
  return index


def from_faiss_ivf_rq(old, centroids: np.ndarray, tables: np.ndarray,
                      metric: Literal["l2", "ip"]) -> IVFIndex:
  """Converts an index saved by qinco-jax before the per-query-table scan (a faiss
  `IVF{K}_HNSW32,RQ{M}x8_Nqint8` holding the codes) into an `IVFIndex` with the same
  codes and ids; the levels of v are fitted on (a sample of) the stored codes. Save the
  result again to skip the conversion on later loads."""
  import faiss
  ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(old))
  M = np.shape(tables)[0]
  parts, ids = [], []
  for l in range(ivf.nlist):
    n = ivf.invlists.list_size(l)
    if not n:
      continue
    ids.append(faiss.rev_swig_ptr(ivf.invlists.get_ids(l), n).copy())
    raw = faiss.rev_swig_ptr(ivf.invlists.get_codes(l), n * ivf.code_size).copy()
    c = raw.reshape(n, ivf.code_size)[:, :M].astype(np.int64)
    parts.append(np.concatenate([np.full((n, 1), l, np.int64), c], 1))
  codes = np.concatenate(parts) if parts else np.zeros((0, M + 1), np.int64)
  all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
  order = np.argsort(all_ids, kind="stable")
  # The levels of v are fitted on (at most a million of) the stored codes.
  rng = np.random.default_rng(0)
  train = (codes[np.sort(rng.choice(len(codes), min(len(codes), 1 << 20), replace=False))]
           if len(codes) else np.zeros((1, M + 1), np.int64))
  return build_index(centroids, tables, train, codes[order], all_ids[order], metric=metric)
