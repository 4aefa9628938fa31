"""`Index`: an IVF-QINCo2 nearest-neighbour index with faiss's interface.

    index = qj.Index(codec)              # an IVF-QINCo2 codec (cfg.ivf_K > 0)
    index.train(xt)                      # AQ and pairwise decoders, on encoded xt
    index.add(xb)                        # encode and store (call again to add more)
    D, I = index.search(xq, 10, nprobe=16)
    index.remove_ids(np.array([3, 7]))
    index.save("my_index"); index = qj.load_index("my_index")

It is the build and search stages of the search job (`job`): it wraps the
decoders of `decoders.fit_decoders`, the inverted lists holding the codes
(`lists.build_index`, scanned with one look-up table per query) and the query path
of `query.Searcher` (IVF/AQ -> pairwise shortlist -> QINCo2 re-rank). Metrics:

  "l2"      squared Euclidean distances, smallest first.
  "ip"      inner products <q, x>, largest first: the lists are probed by <q, c_IVF>
            and every shortlist and the final re-rank score <q, reconstruction> (as
            faiss's METRIC_INNER_PRODUCT indexes do). The codec still codes x in L2.
  "cosine"  vectors and queries are normalised to unit length, then searched in L2;
            D holds ||q - x||^2 = 2 - 2 cos(q, x) for the normalised vectors, smallest
            first. A cosine index codes unit vectors, so build its codec (and IVF
            centroids) from normalised training vectors.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Literal

import numpy as np

from qinco_jax import checkpoint, data
from qinco_jax.codec import load as load_codec
from qinco_jax.pairwise import PairwiseDecoder
from qinco_jax.search import decoders
from qinco_jax.search import lists as lists_lib
from qinco_jax.search.query import Searcher, SearchParams

Metric = Literal["l2", "ip", "cosine"]
META_FILE = "qinco_jax_index.json"
IVF_FILE = "ivf.npz"  # `lists.IVFIndex.arrays`
LEGACY_FILE = "index.faiss"  # indexes saved before the per-query-table scan


class Index:
  """A searchable collection of QINCo2-coded vectors (see the module docstring).

  Args:
    codec: an IVF-QINCo2 codec (`QincoConfig(ivf_K=...)`), trained or RQ-initialised.
    metric: "l2", "ip" or "cosine" (see the module docstring).
    A, B: encoding beam of `train` and `add` (default: the codec's training A, B).
    **fit_kw: options of `decoders.fit_decoders` (pairwise decoder).
  """

  def __init__(self, codec, metric: Metric = "l2", *, A: int | None = None,
               B: int | None = None, **fit_kw):
    if not getattr(codec, "cfg", None) or not codec.cfg.ivf_K:
      raise ValueError("Index needs an IVF-QINCo2 codec (QincoConfig(ivf_K=...) > 0), "
                       f"got {codec!r}")
    if metric not in ("l2", "ip", "cosine"):
      raise ValueError(f"metric must be 'l2', 'ip' or 'cosine', got {metric!r}")
    self.codec, self.metric, self.A, self.B = codec, metric, A, B
    self.fit_kw = fit_kw
    self._dec: decoders.Decoders | None = None
    self._ivf: lists_lib.IVFIndex | None = None

  # -------------------------------------------------------------- state
  @property
  def is_trained(self) -> bool:
    return self._ivf is not None

  @property
  def ntotal(self) -> int:
    return 0 if self._ivf is None else self._ivf.ntotal

  @property
  def d(self) -> int:
    return self.codec.d

  def _vectors(self, x, name: str) -> np.ndarray:
    x = data.as_float32(np.asarray(x), d=self.d, name=name)
    if self.metric == "cosine":
      norms = np.linalg.norm(x, axis=1, keepdims=True)
      if (norms == 0).any():
        raise ValueError(f"{name}: row {int(np.flatnonzero(norms == 0)[0])} is all zeros, "
                         "which has no direction (metric='cosine')")
      x = x / norms
    return x

  def _require_trained(self, what: str):
    if not self.is_trained:
      raise RuntimeError(f"{what} needs a trained index: call index.train(x) first")

  def searcher(self) -> Searcher:
    """The query path behind `search` (`query.Searcher`): its `search` also returns
    the seconds spent per stage, and `sweep.run_sweep` tunes its settings."""
    self._require_trained("searcher")
    d = self._dec
    assert d is not None and self._ivf is not None  # trained
    return Searcher(self.codec, self._ivf, d.centroids, d.pairwise, d.extra)

  # -------------------------------------------------------------- faiss verbs
  def train(self, x, *, codes=None, verbose: bool = False):
    """Fits the AQ and pairwise decoders on (up to 1M of) these vectors, (n, d) raw
    units; `codes` are their codes if already encoded. Replaces an earlier training
    and empties the index."""
    x = self._vectors(x[:self.fit_kw.get("n_aq_train", decoders.N_AQ_TRAIN)],
                      "training vectors")
    self._dec = decoders.fit_decoders(self.codec, x, A=self.A, B=self.B,
                                      train_codes=codes, verbose=verbose, **self.fit_kw)
    M = self.codec.M
    self._ivf = lists_lib.build_index(self._dec.centroids, self._dec.tables,
                                        self._dec.train_codes,
                                         np.zeros((0, M + 1), np.int32),
                                         metric="ip" if self.metric == "ip" else "l2")

  def add(self, x, ids=None, *, verbose: bool = False) -> np.ndarray:
    """Encodes (n, d) vectors and stores their codes; ids (n,) int64 default to
    ntotal, ntotal + 1, ... Returns the codes (n, M + 1)."""
    self._require_trained("add")
    x = self._vectors(x, "vectors")
    codes = self.codec.encode(x, A=self.A, B=self.B, verbose=verbose)
    self.add_codes(codes, ids)
    return codes

  def add_codes(self, codes, ids=None):
    """Stores precomputed codes (n, M + 1) (column 0: list id) under ids (n,)."""
    self._require_trained("add_codes")
    codes = data.check_int_matrix(codes, "codes")
    if codes.shape[1] != self.codec.n_codes:
      raise ValueError(f"codes: expected {self.codec.n_codes} columns (list id + M), got "
                       f"{codes.shape[1]}")
    self.codec._check_codes(codes)
    assert self._ivf is not None  # trained
    self._ivf.add(codes, ids)

  def search(self, queries, k: int, *, nprobe: int = 16, ef_search: int = 64,
             nshort: int = 100, nmid_short: int = 4, batch: int = 1024
             ) -> tuple[np.ndarray, np.ndarray]:
    """k nearest stored vectors of each query.

    Args:
      queries: (nq, d) raw units.
      k: results per query.
      nprobe, ef_search: inverted lists visited, HNSW efSearch of the coarse quantiser.
      nshort: candidates re-ranked by the full QINCo2 decoding (at least k are).
      nmid_short: the pairwise shortlist is nmid_short * nshort long.
    Returns:
      D (nq, k) float32 squared distances, smallest first (inner products, largest
      first, for "ip"; see the module docstring for "cosine"), and I (nq, k) int64
      ids; -1 (with D = inf, or -inf for "ip") only where the probed lists hold fewer
      than k vectors (a warning says how often).
    """
    self._require_trained("search")
    q = self._vectors(queries, "queries")
    p = SearchParams(nprobe=nprobe, ef_search=ef_search, nshort=nshort,
                     nmid_short=nmid_short)
    D, I, _ = self.searcher().search(q, k=k, params=p, batch=batch)
    return D, I

  def remove_ids(self, ids) -> int:
    """Removes the vectors with these ids; returns how many were removed."""
    self._require_trained("remove_ids")
    assert self._ivf is not None  # trained
    return self._ivf.remove_ids(ids)

  # -------------------------------------------------------------- files
  def save(self, path: str | os.PathLike):
    """Writes the index to directory `path` (created; an existing index directory is
    replaced as a whole, any other non-empty directory refused). The files go to a
    temporary sibling first, so an interrupted save leaves the earlier index intact.
    `load_index` reads it."""
    self._require_trained("save")
    path = Path(path).absolute()
    if path.exists() and not (path.is_dir() and (
        not any(path.iterdir()) or (path / META_FILE).exists())):
      raise ValueError(f"cannot save the index to {str(path)!r}: it exists and is "
                       "not a qinco-jax index (nor an empty directory)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
      tmp.mkdir()
      d = self._dec
      assert d is not None and self._ivf is not None  # trained
      self.codec.save(tmp / "model")
      for name, arr in (("centroids", d.centroids), ("aq_tables", d.tables),
                        ("extra_codes", d.extra)):
        np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
      d.pairwise.save(tmp / "pairwise.npz")
      np.savez(tmp / IVF_FILE, **self._ivf.arrays())
      meta = {"metric": self.metric, "A": self.A, "B": self.B}
      (tmp / META_FILE).write_text(json.dumps(meta))
      checkpoint.atomic_replace_dir(tmp, path)
    finally:
      if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)

  def __repr__(self) -> str:
    return (f"Index(ntotal={self.ntotal}, metric={self.metric!r}, d={self.d}, "
            f"ivf_K={self.codec.cfg.ivf_K}, M={self.codec.M})")


def load_index(path: str | os.PathLike) -> Index:
  """Reads an index written by `Index.save` (in any process). An index saved before
  the per-query-table scan (with an `index.faiss` file) is converted on reading."""
  path = Path(path)
  meta_path = path / META_FILE
  if not meta_path.exists():
    raise FileNotFoundError(f"no qinco-jax index at {str(path)!r} ({META_FILE} missing)")
  meta = json.loads(meta_path.read_text())
  index = Index(load_codec(path / "model"), meta["metric"], A=meta.get("A"),
                B=meta.get("B"))
  index._dec = dec = decoders.Decoders(
      np.load(path / "centroids.npy"), np.load(path / "aq_tables.npy"),
      PairwiseDecoder.load(path / "pairwise.npz"), np.load(path / "extra_codes.npy"),
      np.zeros((0, index.codec.n_codes), np.int32))
  metric: Literal["l2", "ip"] = "ip" if index.metric == "ip" else "l2"
  if (path / IVF_FILE).exists():
    with np.load(path / IVF_FILE, allow_pickle=False) as arrays:
      index._ivf = lists_lib.IVFIndex.from_arrays(arrays)
  elif (path / LEGACY_FILE).exists():
    import faiss
    index._ivf = lists_lib.from_faiss_ivf_rq(faiss.read_index(str(path / LEGACY_FILE)),
                                             dec.centroids, dec.tables, metric)
  else:
    raise FileNotFoundError(f"{str(path)!r} holds no inverted lists ({IVF_FILE} missing)")
  return index
