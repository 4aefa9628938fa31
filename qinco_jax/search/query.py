"""Query-time pipeline (spec 12.3): IVF/AQ search -> pairwise shortlist -> QINCo2 re-rank.

Every distance is in raw units: the inverted lists (`lists.IVFIndex`, one look-up table
per query) scores ||q - c_IVF - AQ(codes)||^2, the pairwise decoder approximates
c_IVF + pairwise(codes), and the final re-rank uses the full QINCo2 decode
(de-normalised by the codec). An index built for inner products
(`lists.build_index(metric="ip")`) scores <q, .> of the same reconstructions at every
stage instead, largest first.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import TYPE_CHECKING

import numpy as np

from qinco_jax.data import as_float32

if TYPE_CHECKING:  # annotations only: the query path needs no codec module
  from qinco_jax.codec import Codec
  from qinco_jax.pairwise import PairwiseDecoder
  from qinco_jax.search.fastscan import Lists


MAX_SHORTLIST = 8000  # candidates the IVF/AQ stage returns per query at most
BATCH_ROWS = 1 << 17  # default batch: queries x first-stage candidates per batch at most
MIN_BATCH = 1024  # ... but at least this many queries per batch


class FewerResultsWarning(UserWarning):
  """Some queries got fewer than min(k, ntotal) results (their probed lists hold fewer)."""


def _check_search_args(k, p: SearchParams, batch):
  def positive(name, v, hi=None):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1 or (
        hi is not None and v > hi):
      rng = f"an int in [1, {hi}]" if hi else "an int >= 1"
      raise ValueError(f"{name} must be {rng}, got {v!r}")
  positive("k", k, MAX_SHORTLIST)
  if batch is not None:
    positive("batch", batch)
  if not isinstance(p, SearchParams):
    raise ValueError(f"params must be a SearchParams, got {type(p).__name__}")
  positive("nprobe", p.nprobe)
  positive("ef_search", p.ef_search)
  positive("nshort", p.nshort, MAX_SHORTLIST)
  positive("nmid_short", p.nmid_short)


@dataclasses.dataclass(frozen=True)
class SearchParams:
  nprobe: int = 16  # inverted lists visited
  ef_search: int = 64  # HNSW efSearch of the coarse quantiser
  nshort: int = 100  # candidates decoded with QINCo2 (the final shortlist)
  nmid_short: int = 4  # pairwise shortlist = nmid_short * nshort (a multiplier)
  use_pairwise: bool = True
  use_qinco: bool = True  # False: stop after the AQ (or pairwise) stage


def first_stage_size(k: int, p: SearchParams) -> int:
  """Candidates the first stage returns per query: the pairwise shortlist
  (nmid_short x nshort, nshort at least k), at least nshort, at most MAX_SHORTLIST."""
  nshort = max(p.nshort, k)
  return min(max(p.nmid_short * nshort, nshort), MAX_SHORTLIST)


@dataclasses.dataclass
class Searcher:
  """Everything needed at query time.

  Attributes:
    codec: the IVF-QINCo2 codec (full decoder).
    index: the inverted lists holding the codes (`lists.IVFIndex` for 8-bit codes,
      `fastscan.FastScanLists` for 4-bit ones).
    centroids: (K_IVF, D) raw IVF centroids.
    pairwise: a `pairwise.PairwiseDecoder` or None.
    extra_codes: (K_IVF, 5) IVF-derived codes of the pairwise decoder, or None.
  """

  codec: Codec
  index: Lists
  centroids: np.ndarray
  pairwise: PairwiseDecoder | None = None
  extra_codes: np.ndarray | None = None

  def search(self, queries: np.ndarray, k: int = 100, params: SearchParams = SearchParams(),
             batch: int | None = None
             ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Searches raw queries (nq, D) with every CPU thread faiss has.

    Calls may overlap (nothing shared is changed); adds and removals on the index
    must not overlap them.

    The QINCo2 re-rank decodes max(nshort, k) candidates, so k results come back
    whenever the probed lists hold k vectors; when they hold fewer the rows are padded
    with id -1 and distance inf, with a warning saying how many queries that hit.
    Every argument is checked first (ValueError naming it).

    Queries go through the stages `batch` at a time; by default as many as keep
    queries x first-stage candidates within BATCH_ROWS (at least MIN_BATCH): short
    shortlists run in large batches, where the list search and the scan cost less per
    query (on 2 cores, one batch of 8,192 queries with 1 candidate each took 0.66x the
    time of 8 batches of 1,024).

    Returns:
      D (nq, k) float32 squared distances, smallest first (inner products, largest
      first, for an "ip" index), I (nq, k) int64 database ids (-1, with D = inf or
      -inf for "ip", when fewer results), and the seconds spent per stage.
    """
    _check_search_args(k, params, batch)
    if batch is None:
      batch = max(MIN_BATCH, BATCH_ROWS // first_stage_size(k, params))
    q_all = as_float32(np.asarray(queries), d=self.centroids.shape[1], name="queries")
    nq = len(q_all)
    ip = self.index.metric == "ip"
    out_D = np.full((nq, k), -np.inf if ip else np.inf, np.float32)
    out_I = np.full((nq, k), -1, np.int64)
    times = {"ivf_aq": 0.0, "pairwise": 0.0, "decode": 0.0}
    if self.index.ntotal == 0:  # nothing stored: every row stays padded
      return out_D, out_I, times
    for s in range(0, nq, batch):
      Db, Ib, tb = self._search_batch(q_all[s:s + batch], k, params, ip)
      out_D[s:s + batch], out_I[s:s + batch] = Db, Ib
      for key in times:
        times[key] += tb[key]
    short = int((out_I[:, min(k, self.index.ntotal) - 1] < 0).sum())
    if short:
      warnings.warn(f"{short} of {nq} queries got fewer than min(k={k}, ntotal="
                    f"{self.index.ntotal}) results: the {params.nprobe} inverted lists "
                    "probed for them hold fewer vectors; raise nprobe", FewerResultsWarning,
                    stacklevel=2)
    return out_D, out_I, times

  def _search_batch(self, q: np.ndarray, k: int, p: SearchParams, ip: bool):
    """Scores are kept as a key where smaller is better: the squared distance, or the
    negated inner product when `ip`."""
    def key(x_hat):  # (nq, n, D) reconstructions -> (nq, n)
      if ip:
        return -np.einsum("qnd,qd->qn", x_hat, q)
      return ((x_hat - q[:, None, :]) ** 2).sum(-1)

    M = self.index.M
    nshort = max(p.nshort, k)  # the re-ranked shortlist holds at least k candidates
    final = nshort if p.use_qinco else k
    n1 = first_stage_size(k, p)
    t0 = time.perf_counter()
    D1, lists, codes, ids = self.index.search(q, n1, nprobe=p.nprobe, ef_search=p.ef_search)
    times = {"ivf_aq": time.perf_counter() - t0, "pairwise": 0.0, "decode": 0.0}
    D1 = -D1 if ip else D1
    found = ids >= 0
    D1[~found] = np.inf
    lists = np.where(found, lists, 0)  # (nq, n1); padding rows decode list 0, then drop
    codes = codes.astype(np.int32)  # (nq, n1, M)
    if p.use_pairwise and self.pairwise is not None and n1 > nshort:
      t0 = time.perf_counter()
      assert self.extra_codes is not None  # they come with the pairwise decoder
      ext = np.concatenate([codes, self.extra_codes[lists]], axis=2)
      approx = (self.pairwise.decode(ext.reshape(-1, ext.shape[2]))
                + self.centroids[lists.ravel()]).reshape(len(q), n1, -1)
      dist = key(approx)
      dist[ids < 0] = np.inf
      keep = np.argsort(dist, axis=1, kind="stable")[:, :nshort]
      codes, lists, ids = (np.take_along_axis(a, keep[..., None] if a.ndim == 3 else keep, 1)
                           for a in (codes, lists, ids))
      D1 = np.take_along_axis(dist, keep, 1)
      times["pairwise"] = time.perf_counter() - t0
    else:
      codes, lists, ids, D1 = codes[:, :final], lists[:, :final], ids[:, :final], D1[:, :final]
    if p.use_qinco and nshort > 1:
      t0 = time.perf_counter()
      full = np.concatenate([lists[..., None], codes], axis=2).reshape(-1, M + 1)
      x_hat = self.codec.decode(full, verbose=False).reshape(len(q), -1, q.shape[1])
      D1 = key(x_hat)
      D1[ids < 0] = np.inf
      times["decode"] = time.perf_counter() - t0
    order = np.argsort(D1, axis=1, kind="stable")[:, :k]
    Dk = np.take_along_axis(D1, order, 1).astype(np.float32)
    Dk = -Dk if ip else Dk
    Ik = np.take_along_axis(ids, order, 1)
    if Dk.shape[1] < k:
      pad = k - Dk.shape[1]
      Dk = np.pad(Dk, ((0, 0), (0, pad)), constant_values=-np.inf if ip else np.inf)
      Ik = np.pad(Ik, ((0, 0), (0, pad)), constant_values=-1)
    return Dk, Ik, times
