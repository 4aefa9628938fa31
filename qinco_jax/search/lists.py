"""Inverted lists of precomputed QINCo2 codes, scanned with one look-up table per query
(spec 12.1 step 5).

The AQ stage ranks a database vector stored in list l with codes i_1..i_M by

    ||q - c_l - x_hat||^2 = ||q||^2 - 2 <q, c_l> - 2 sum_m <q, T_m[i_m]> + ||c_l + x_hat||^2,

with x_hat = sum_m T_m[i_m] (the least-squares AQ tables, raw units). Only the sum
depends on the codes, through the table <q, T_m[k]> (M x 256), and that table is the
same for every list: it is computed once per query. (faiss's IVF additive-quantizer
scanners score the residual q - c_l and rebuild the table for every probed list; see
docs/design.md for what that costs.) The last term is stored per vector in one byte:

    v = -(||c_l + x_hat||^2 - ||c_l||^2) / 2 = -<c_l, x_hat> - ||x_hat||^2 / 2,

quantised to 256 levels by a 1-D k-means on training reconstructions (`fit_levels`).

The scan is faiss's inverted-list PQ scanner for inner products (which builds its table
once per query) in a lifted space of (M + 1) D dimensions: the query becomes
q' = [q, ..., q, e] (M copies of q, then e = (1, 0, ..., 0)); PQ sub-quantiser m < M
holds T_m, sub-quantiser M holds the levels of v in its first coordinate, and each
list's term is <q', c'_l> with c'_l = [c_l, 0, ..., 0, -||c_l||^2 / 2, 0, ...]. So
faiss returns

    S = <q, c_l + x_hat> - ||c_l + x_hat||^2 / 2   (up to the byte of v),

and ||q - c_l - x_hat||^2 = ||q||^2 - 2 S. Lists are chosen (`assign`) by an HNSW
graph over the raw centroids, or for up to FLAT_COARSE_MAX lists by an exact (flat)
search, which is faster there (GloVe's 1024 lists: docs/design.md); `scan` then reads
the chosen lists. With metric="ip" the score is <q, c_l + x_hat> (lists chosen by
<q, c_l>, largest first) and no byte of v is stored.

The lists live in memory or on disk:

  in memory (`build_index`, `add`): row arrays (list, M codes, id, norm byte; spare
    capacity doubled when full, so n rows added in many calls copy O(n) bytes in all)
    and faiss's ArrayInvertedLists holding each row's codes under its row number:
    M + 13 bytes here plus M + 9 in faiss per vector (M + 12 and M + 8 for "ip").
    `remove_ids` compacts the rows and refills faiss's lists, O(ntotal).
  on disk (`IVFIndex.open`): one file in faiss's own inverted-lists layout
    (`listfile`), memory-mapped by faiss as a read-only OnDiskInvertedLists: M + 9
    bytes per vector on disk, and in memory only the centroids, tables and coarse
    index plus the pages the probed lists touch. The scan returns (list, offset)
    pairs; the codes and ids of the results are read from the same map. `add` and
    `remove_ids` first read the lists into memory (`to_memory`, O(ntotal)); a
    database larger than memory grows by merging list files and shrinks by writing
    one without the removed rows (`search.build`).

Either way `scan` returns the n best candidates with their lists, codes and ids, so
the later stages never see how they are stored (and another first stage, such as a
fast-scan one, can stand in by returning the same). A search changes nothing shared,
so searches may run concurrently; `add` and `remove_ids` must not overlap them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from qinco_jax import aq, data
from qinco_jax.search import coarse as coarse_lib
from qinco_jax.search import listfile


def _faiss():
  import faiss
  return faiss


METRICS = {"l2": lambda: _faiss().METRIC_L2, "ip": lambda: _faiss().METRIC_INNER_PRODUCT}
N_LEVELS = 256  # levels of the stored norm term v (one byte)
FLAT_COARSE_MAX = coarse_lib.FLAT_COARSE_MAX  # coarse="auto": exact list search up to here
EF_CONSTRUCTION = coarse_lib.EF_CONSTRUCTION
LISTS_FILE = "invlists.faiss"  # `listfile` layout
META_FILE = "lists.json"
Coarse = Literal["auto", "flat", "hnsw"]
MAX_ID = np.iinfo(np.int64).max


def check_codes(codes, M: int, nlist: int, name: str = "codes", K: int = 256) -> np.ndarray:
  """The one check of codes entering the lists: (n, M + 1) integers, column 0 a list
  id in 0..nlist-1 and codes in 0..K-1. Returns them (no copy)."""
  codes = data.check_int_matrix(codes, name)
  if codes.shape[1] != M + 1:
    raise ValueError(f"{name} must be (n, {M + 1}) (IVF id + M codes), got {codes.shape}")
  if len(codes) and (codes[:, 0].max() >= nlist or codes[:, 1:].max() >= K):
    raise ValueError(f"{name}: list ids must lie in 0..{nlist - 1} and codes in 0..{K - 1}, "
                     f"got maxima {codes[:, 0].max()} and {codes[:, 1:].max()}")
  return codes


def check_ids(ids, n: int, name: str = "ids") -> np.ndarray:
  """(n,) integer ids in 0..2**63-1 (-1 marks a missing result), as int64."""
  ids = np.asarray(ids)
  if ids.shape != (n,) or ids.dtype.kind not in "iu":
    raise ValueError(f"{name}: expected ({n},) integers (one per vector), got shape "
                     f"{ids.shape} dtype {ids.dtype}")
  if n and (ids.min() < 0 or (ids.dtype.kind == "u" and ids.max() > MAX_ID)):
    bad = ids.min() if ids.min() < 0 else ids.max()
    raise ValueError(f"{name} must lie in 0..2**63-1 (-1 marks a missing result), got "
                     f"{bad}")
  return ids.astype(np.int64)


def removal_ids(ids) -> np.ndarray:
  """The one check of the ids a removal is asked for: integers (any shape), as a flat
  int64 array."""
  ids = np.asarray(ids)
  if ids.dtype.kind not in "iu":
    raise ValueError(f"remove_ids needs integer ids, got dtype {ids.dtype}")
  return ids.astype(np.int64).ravel()


def fit_levels(v: np.ndarray, n_levels: int = N_LEVELS, iters: int = 25) -> np.ndarray:
  """1-D k-means (Lloyd) of the values v, started from their quantiles.

  Args:
    v: (n,) real values, n >= 1.
  Returns:
    (n_levels,) float32, sorted ascending (repeated values where v has fewer distinct
    values than levels).
  """
  v = np.sort(np.asarray(v, np.float64).ravel())
  if v.size == 0:
    raise ValueError("fit_levels needs at least one value, got none")
  levels = np.quantile(v, (np.arange(n_levels) + 0.5) / n_levels)
  for _ in range(iters):
    a = np.searchsorted((levels[1:] + levels[:-1]) / 2, v)
    cnt = np.bincount(a, minlength=n_levels)
    sums = np.bincount(a, v, minlength=n_levels)
    levels = np.sort(np.where(cnt > 0, sums / np.maximum(cnt, 1), levels))
  return levels.astype(np.float32)


def quantize_levels(v: np.ndarray, levels: np.ndarray) -> np.ndarray:
  """Index of the nearest of the sorted `levels` for each value: (n,) uint8."""
  lv = np.asarray(levels, np.float64)
  return np.searchsorted((lv[1:] + lv[:-1]) / 2, np.asarray(v, np.float64)).astype(np.uint8)


def norm_term(centroids: np.ndarray, tables: np.ndarray, codes: np.ndarray) -> np.ndarray:
  """v = -<c_l, x_hat> - ||x_hat||^2 / 2 for codes (n, M + 1) (column 0: list l), float64."""
  x_hat = aq.aq_decode(tables, codes[:, 1:]).astype(np.float64)
  c = np.asarray(centroids, np.float64)[codes[:, 0]]
  return -(c * x_hat).sum(1) - 0.5 * (x_hat * x_hat).sum(1)


class RowStore:
  """The rows behind inverted lists: arrays of one length (one row per stored vector,
  an "ids" array among them) with spare capacity, doubled when full, so that n rows
  added in many calls copy O(n) bytes in all. `buf` holds the arrays with their spare
  rows (index them by row number), `n` the rows in use."""

  def __init__(self, **empty: np.ndarray):
    self.buf = dict(empty)
    self.n = 0

  def view(self) -> dict[str, np.ndarray]:
    """The rows in use: views of `buf`, in row order."""
    return {k: v[:self.n] for k, v in self.buf.items()}

  def append(self, **rows: np.ndarray) -> np.ndarray:
    """Writes rows (one array per buffer) after the last one; returns their row
    numbers, (n,) int64."""
    start, need = self.n, self.n + len(rows["ids"])
    if len(self.buf["ids"]) < need:
      size = max(need, 2 * len(self.buf["ids"]), 1024)
      for name, buf in self.buf.items():
        grown = np.zeros((size,) + buf.shape[1:], buf.dtype)
        grown[:self.n] = buf[:self.n]
        self.buf[name] = grown
    for name, v in rows.items():
      self.buf[name][start:need] = v
    self.n = need
    return np.arange(start, need, dtype=np.int64)

  def drop_ids(self, ids: np.ndarray) -> int:
    """Removes the rows holding these ids (int64, `removal_ids`), keeping the others in
    order; returns how many were removed."""
    drop = np.isin(self.buf["ids"][:self.n], ids)
    n = int(drop.sum())
    if n:
      self.buf = {k: v[:self.n][~drop] for k, v in self.buf.items()}
      self.n -= n
    return n


class ListsBase:
  """What both kinds of inverted lists share (`IVFIndex` here, `fastscan.FastScanLists`
  for 4-bit codes): sizes read from their centroids and tables, the row views, the
  list search and `search` = `scan` of the assigned lists. A subclass sets
  `centroids` (K_IVF, D), `tables` (M, K, D) and `coarse`, and defines `rows()` and
  `scan(q, Dc, Ic, n)`."""

  centroids: np.ndarray
  tables: np.ndarray
  coarse: Any

  @property
  def nlist(self) -> int:
    return len(self.centroids)

  @property
  def M(self) -> int:
    return self.tables.shape[0]

  @property
  def exact_coarse(self) -> bool:
    """True when lists are chosen by an exact search (efSearch plays no part)."""
    return coarse_lib.is_exact(self.coarse)

  def rows(self) -> dict[str, np.ndarray]:
    raise NotImplementedError

  lists = property(lambda self: self.rows()["lists"])
  codes = property(lambda self: self.rows()["codes"])
  ids = property(lambda self: self.rows()["ids"])

  def assign(self, q: np.ndarray, nprobe: int, ef_search: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """The nprobe lists nearest each query (`coarse.search_lists`): (scores (nq,
    nprobe) float32, lists (nq, nprobe) int64; -1 where an HNSW search finds fewer)."""
    return coarse_lib.search_lists(self.coarse, q, nprobe, ef_search)

  def scan(self, q: np.ndarray, Dc: np.ndarray, Ic: np.ndarray, n: int):
    raise NotImplementedError

  def search(self, q: np.ndarray, n: int, nprobe: int, ef_search: int = 64):
    """`scan` of the `assign`ed lists: (D, lists, codes, ids) of the n best rows of
    the nprobe lists nearest each query (q: (nq, D) float32, checked by the caller)."""
    q = np.ascontiguousarray(q, np.float32)
    return self.scan(q, *self.assign(q, nprobe, ef_search), n)


class IVFIndex(ListsBase):
  """Inverted lists of QINCo2 codes with the per-query-table scan (module docstring).

  Built by `build_index` (in memory) or `IVFIndex.open` (a saved one, memory-mapped).

  Attributes:
    centroids: (K_IVF, D) float32 raw IVF centroids.
    tables: (M, 256, D) float32 AQ tables.
    levels: (256,) float32 levels of v (empty for metric "ip").
    metric: "l2" or "ip".
    next_id: the first id of an `add` without ids (one past the largest id stored
      so far, so ids stay unique after removals).
  """

  def __init__(self, centroids, tables, levels, metric: Literal["l2", "ip"] = "l2",
               ef_construction: int = EF_CONSTRUCTION, coarse: Coarse | object = "auto"):
    faiss = _faiss()
    if metric not in METRICS:
      raise ValueError(f"metric must be one of {tuple(METRICS)}, got {metric!r}")
    self.centroids = np.ascontiguousarray(centroids, np.float32)
    self.tables = np.ascontiguousarray(tables, np.float32)
    K_ivf, D = self.centroids.shape
    M, K, Dt = self.tables.shape
    if K != 256 or Dt != D:
      raise ValueError(f"tables must be (M, 256, {D}) (8-bit codes), got {self.tables.shape}")
    self.metric = metric
    self.levels = np.asarray(levels, np.float32) if metric == "l2" else np.zeros(0, np.float32)
    if metric == "l2" and self.levels.shape != (N_LEVELS,):
      raise ValueError(f"levels must be ({N_LEVELS},), got {self.levels.shape}")
    self.next_id = 0
    self.disk: listfile.ListFile | None = None  # set by `open`
    # The rows; "ip" stores no norm byte ("vcodes").
    self._rows = RowStore(lists=np.zeros(0, np.int32), codes=np.zeros((0, M), np.uint8),
                          ids=np.zeros(0, np.int64))
    if metric == "l2":
      self._rows.buf["vcodes"] = np.zeros(0, np.uint8)
    # A faiss index over the raw centroids: built here, or given (one built by the
    # ivf stage, or read by `open`), with the same centroids and metric.
    given: Any = coarse
    self.coarse: Any = (coarse_lib.build_coarse(self.centroids, given, ef_construction,
                                                metric) if isinstance(given, str) else given)
    if self.coarse.ntotal != K_ivf or self.coarse.d != D or self.coarse.metric_type != (
        METRICS[metric]()):
      raise ValueError(f"coarse index: expected {K_ivf} centroids of dimension {D} and "
                       f"metric {metric}, got {self.coarse.ntotal} of {self.coarse.d}")
    nb = 1 if metric == "l2" else 0  # bytes of v
    self._D_lift = (M + nb) * D
    # The scanner's list term <q', c'_l>: its quantiser is only asked to reconstruct
    # c'_l (lists are chosen by `coarse`), from D (+ 1) stored numbers per list.
    keep = np.arange(D + nb, dtype=np.int32)
    if nb:
      keep[D] = M * D
    self._remap = faiss.RemapDimensionsTransform(self._D_lift, D + nb, False)
    faiss.copy_array_to_vector(keep, self._remap.map)
    self._flat = faiss.IndexFlatIP(D + nb)
    lifted = self.centroids
    if nb:
      sq = (self.centroids.astype(np.float64) ** 2).sum(1, keepdims=True)
      lifted = np.concatenate([lifted, (-0.5 * sq).astype(np.float32)], 1)
    self._flat.add(np.ascontiguousarray(lifted))
    self._quantizer = faiss.IndexPreTransform(self._remap, self._flat)
    self.scanner = faiss.IndexIVFPQ(self._quantizer, self._D_lift, K_ivf, M + nb, 8,
                                    faiss.METRIC_INNER_PRODUCT)
    self.scanner.by_residual = True  # adds the list term <q', c'_l>
    cb = np.zeros((M + nb, 256, D), np.float32)
    cb[:M] = self.tables
    if nb:
      cb[M, :, 0] = self.levels
    faiss.copy_array_to_vector(cb.ravel(), self.scanner.pq.centroids)
    self.scanner.is_trained = True

  # ------------------------------------------------------------------ sizes
  @property
  def ntotal(self) -> int:
    return self.disk.ntotal if self.disk is not None else self._rows.n

  K = 256  # codewords per table

  @property
  def code_size(self) -> int:
    """Bytes per vector in faiss's lists: the M codes, then the norm byte ("l2")."""
    return self.M + (1 if self.metric == "l2" else 0)

  def list_codes(self, codes: np.ndarray) -> np.ndarray:
    """What the list file stores for codes (n, M + 1) (checked): (n, code_size) uint8,
    the M codes then the norm byte ("l2"; computed)."""
    p = codes[:, 1:].astype(np.uint8)
    if self.metric == "l2":
      p = np.concatenate([p, self.norm_bytes(codes)[:, None]], 1)
    return p

  def rows(self) -> dict[str, np.ndarray]:
    """Every stored row: "lists" (n,) int32, "codes" (n, M) uint8, "ids" (n,) int64 and
    "vcodes" (n,) uint8 norm bytes ("l2"). In memory: views in row order; on disk:
    read in list order (O(ntotal) memory)."""
    if self.disk is None:
      return self._rows.view()
    codes, ids = self.disk.read_lists(0, self.nlist)
    out = {"lists": np.repeat(np.arange(self.nlist, dtype=np.int32), self.disk.sizes),
           "codes": codes[:, :self.M], "ids": ids}
    if self.metric == "l2":
      out["vcodes"] = codes[:, self.M]
    return out

  # ------------------------------------------------------------------ content
  def add(self, codes: np.ndarray, ids: np.ndarray | None = None, chunk: int = 1 << 15,
          vcodes: np.ndarray | None = None):
    """Appends precomputed codes (n, M + 1) (column 0: list id) under ids (n,) integers
    in 0..2**63-1 (default next_id, next_id + 1, ...). Nothing is re-encoded. `vcodes`
    (n,) uint8 are the norm bytes if known; otherwise they are computed. An index
    opened from disk is read into memory first (`to_memory`)."""
    codes = check_codes(codes, self.M, self.nlist)
    n = len(codes)
    ids = (np.arange(self.next_id, self.next_id + n, dtype=np.int64) if ids is None
           else check_ids(ids, n))
    if self.metric == "l2" and vcodes is None:
      vcodes = self.norm_bytes(codes, chunk)
    elif vcodes is not None and np.shape(vcodes) != (n,):
      raise ValueError(f"vcodes: expected shape ({n},), got {np.shape(vcodes)}")
    self.to_memory()
    rows = {"lists": codes[:, 0], "codes": codes[:, 1:], "ids": ids}
    if self.metric == "l2":
      rows["vcodes"] = cast(np.ndarray, vcodes)
    self._fill(self._rows.append(**rows))
    if n:
      self.next_id = max(self.next_id, int(ids.max()) + 1)

  def norm_bytes(self, codes: np.ndarray, chunk: int = 1 << 15) -> np.ndarray:
    """The stored byte of v for codes (n, M + 1): (n,) uint8 ("l2" only)."""
    return np.concatenate([np.zeros(0, np.uint8)] + [
        quantize_levels(norm_term(self.centroids, self.tables, codes[s:s + chunk]),
                        self.levels) for s in range(0, len(codes), chunk)])

  def remove_ids(self, ids) -> int:
    """Drops the rows holding these ids ((n,) integers); returns how many were removed.
    O(ntotal): the rows are compacted and faiss's lists refilled (an index opened from
    disk is read into memory first)."""
    ids = removal_ids(ids)
    self.to_memory()
    n = self._rows.drop_ids(ids)
    if n:
      self.scanner.reset()  # row numbers changed: refill every list
      self._fill(np.arange(self._rows.n, dtype=np.int64))
    return n

  def to_memory(self) -> None:
    """Reads the lists of an index opened from disk into memory (O(ntotal)), after
    which `add` and `remove_ids` change it; a no-op for an index in memory."""
    if self.disk is None:
      return
    rows = self.rows()
    self.disk = None
    il = _faiss().ArrayInvertedLists(self.nlist, self.code_size)
    self.scanner.replace_invlists(il, True)
    il.this.disown()  # the scanner owns it now
    self.scanner.ntotal = 0
    self._rows.n = 0
    self._fill(self._rows.append(**rows))

  def _fill(self, rows: np.ndarray):
    """Adds these rows to faiss's inverted lists (labels = row numbers), in faiss's
    own loop (`add_sa_codes`: the list number in front of each code)."""
    if not len(rows):
      return
    nb = self.scanner.coarse_code_size()
    lst = self._rows.buf["lists"][rows].astype(np.int64)
    packed = [(lst[:, None] >> (8 * np.arange(nb))).astype(np.uint8),
              self._rows.buf["codes"][rows]]
    if self.metric == "l2":
      packed.append(self._rows.buf["vcodes"][rows, None])
    packed_arr = np.ascontiguousarray(np.concatenate(packed, 1))
    labels = np.ascontiguousarray(rows, np.int64)
    self.scanner.add_sa_codes(packed_arr, labels)

  # ------------------------------------------------------------------ search
  def scan(self, q: np.ndarray, Dc: np.ndarray, Ic: np.ndarray, n: int):
    """The n best rows (AQ scores) of the given lists of each query.

    Args:
      q: (nq, D) float32 raw queries.
      Dc, Ic: (nq, nprobe) the lists to scan (`assign`); -1 entries are skipped.
    Returns:
      D (nq, n) float32: squared distances smallest first ("l2"; inf where fewer
      results) or inner products largest first ("ip"; -inf); lists (nq, n) int64,
      codes (nq, n, M) uint8 and ids (nq, n) int64 of the results (-1 ids where
      fewer results).
    """
    faiss = _faiss()
    nq, D = q.shape
    lifted = np.zeros((nq, self._D_lift), np.float32)
    lifted[:, :self.M * D] = np.tile(q, (1, self.M))
    if self.metric == "l2":
      lifted[:, self.M * D] = 1.0
    S = np.empty((nq, n), np.float32)
    labels = np.empty((nq, n), np.int64)
    Ic = np.ascontiguousarray(Ic, np.int64)
    Dc = np.ascontiguousarray(Dc, np.float32)
    pairs = self.disk is not None  # on disk: labels are (list << 32 | offset)
    # nprobe goes in per call: nothing shared is changed, so calls may overlap.
    self.scanner.search_preassigned_c(
        nq, faiss.swig_ptr(lifted), int(n), faiss.swig_ptr(Ic), faiss.swig_ptr(Dc),
        faiss.swig_ptr(S), faiss.swig_ptr(labels), pairs,
        faiss.SearchParametersIVF(nprobe=int(Ic.shape[1])))
    found = labels >= 0  # elsewhere the scores are faiss's heap fill value
    lab = np.where(found, labels, 0).ravel()
    if self.disk is not None:
      lists = lab >> 32
      codes, ids = self.disk.rows_at(lists, lab & 0xFFFFFFFF)
      codes = codes[:, :self.M]
    else:
      lists = self._rows.buf["lists"][lab].astype(np.int64)
      codes, ids = self._rows.buf["codes"][lab], self._rows.buf["ids"][lab]
    lists = np.where(found, lists.reshape(nq, n), -1)
    ids = np.where(found, ids.reshape(nq, n), -1)
    codes = codes.reshape(nq, n, self.M)
    if self.metric == "ip":
      S[~found] = -np.inf
      return S, lists, codes, ids
    qn = (q.astype(np.float64) ** 2).sum(1, keepdims=True)
    dist = (qn - 2.0 * np.where(found, S, 0.0)).astype(np.float32)
    dist[~found] = np.inf
    return dist, lists, codes, ids

  # ------------------------------------------------------------------ files
  def save(self, path: str | os.PathLike, on_rows=None) -> None:
    """Writes the lists to directory `path` (created; its files replaced): the list
    file (`listfile` layout), the coarse index and the arrays; `open` reads it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if self.disk is not None:
      if self.disk.path.resolve() != (path / LISTS_FILE).resolve():
        shutil.copyfile(self.disk.path, path / LISTS_FILE)  # streamed
    else:
      r = self.rows()
      packed = r["codes"] if self.metric == "ip" else np.concatenate(
          [r["codes"], r["vcodes"][:, None]], 1)
      listfile.write_lists(path / LISTS_FILE, self.nlist, r["lists"], packed, r["ids"],
                           on_rows=on_rows)
    self.save_meta(path)

  def save_meta(self, path: Path) -> None:
    """Everything but the list file: the arrays, the coarse index and lists.json."""
    faiss = _faiss()
    for name in ("centroids", "tables", "levels"):
      np.save(path / f"{name}.npy", getattr(self, name), allow_pickle=False)
    faiss.write_index(self.coarse, str(path / "coarse.faiss"))
    meta = {"metric": self.metric, "nlist": self.nlist, "M": self.M,
            "code_size": self.code_size, "next_id": self.next_id}
    (path / META_FILE).write_text(json.dumps(meta))

  @classmethod
  def open(cls, path: str | os.PathLike, mmap: bool = True) -> IVFIndex:
    """Opens lists saved by `save` (or written by `search.build`): memory-mapped and
    read-only until `to_memory` (mmap=False: read into memory at once)."""
    faiss = _faiss()
    path = Path(path)
    try:
      meta = json.loads((path / META_FILE).read_text())
      arrays = {k: np.load(path / f"{k}.npy", allow_pickle=False)
                for k in ("centroids", "tables", "levels")}
      coarse = faiss.read_index(str(path / "coarse.faiss"))
    except (OSError, ValueError, RuntimeError) as e:
      raise ValueError(f"inverted lists {str(path)!r} cannot be read: "
                       f"{str(e).splitlines()[0][:200]}") from None
    index = cls(arrays["centroids"], arrays["tables"], arrays["levels"], meta["metric"],
                coarse=coarse)
    index.next_id = int(meta["next_id"])
    lf = listfile.ListFile(path / LISTS_FILE, index.nlist, index.code_size)
    index.disk = lf
    il = lf.faiss_lists()
    index.scanner.replace_invlists(il, True)
    il.this.disown()  # the scanner owns it now
    index.scanner.ntotal = lf.ntotal
    if not mmap:
      index.to_memory()
    return index


def build_index(centroids: np.ndarray, tables: np.ndarray, train_codes: np.ndarray,
                db_codes: np.ndarray, db_ids: np.ndarray | None = None,
                ef_construction: int = EF_CONSTRUCTION, metric: Literal["l2", "ip"] = "l2",
                coarse: Coarse | object = "auto") -> IVFIndex:
  """Builds the searchable index, in memory, from precomputed codes.

  Args:
    centroids: (K_IVF, D) raw IVF centroids.
    tables: (M, K, D) least-squares AQ tables (raw residual units), K = 256.
    train_codes: (n_t, M + 1) codes of training vectors (the levels of v are fitted on
      their reconstructions).
    db_codes: (n, M + 1) int codes of the database; column 0 = IVF list id.
    db_ids: (n,) int64 database ids (default 0..n-1).
    metric: "l2" (squared distances) or "ip" (inner products).
    coarse: how lists are chosen: "flat" (exact), "hnsw" (a graph, efSearch per call)
      or "auto" (flat up to FLAT_COARSE_MAX lists), or a faiss index over the
      centroids built already (`coarse.build_coarse`).
  Returns:
    an `IVFIndex` (ntotal = n).
  """
  index = empty_index(centroids, tables, train_codes, metric, ef_construction, coarse)
  index.add(db_codes, db_ids)
  return index


def empty_index(centroids: np.ndarray, tables: np.ndarray, train_codes: np.ndarray,
                metric: Literal["l2", "ip"] = "l2", ef_construction: int = EF_CONSTRUCTION,
                coarse: Coarse | object = "auto") -> IVFIndex:
  """An `IVFIndex` holding nothing, with the levels of v fitted on the training codes
  (n_t, M + 1) (see `build_index`)."""
  M = np.shape(tables)[0]
  train_codes = check_codes(train_codes, M, len(centroids), "train_codes")
  levels = np.zeros(N_LEVELS, np.float32)
  if metric == "l2":
    if not len(train_codes):
      raise ValueError("train_codes: need at least one row to fit the norm levels")
    levels = fit_levels(norm_term(centroids, tables, train_codes))
  return IVFIndex(centroids, tables, levels, metric, ef_construction, coarse)


__all__ = ["IVFIndex", "ListsBase", "RowStore", "removal_ids", "build_index", "empty_index",
           "fit_levels", "quantize_levels", "norm_term", "check_codes", "check_ids"]
