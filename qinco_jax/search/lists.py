"""IVF index over precomputed QINCo2 codes, scanned with one look-up table per query
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

and ||q - c_l - x_hat||^2 = ||q||^2 - 2 S. Lists are chosen by an HNSW graph over the
raw centroids, or for up to FLAT_COARSE_MAX lists by an exact (flat) search, which is
faster there (GloVe's 1024 lists: docs/design.md). With metric="ip" the score is
<q, c_l + x_hat> (lists chosen by <q, c_l>, largest first) and no byte of v is stored.

faiss stores row numbers as labels; the codes, list numbers and ids of the rows are
held here as arrays too (the later stages of the search read them), so a vector costs
M + 1 code bytes and an 8-byte label in faiss's lists plus M + 13 bytes here (M + 12
for "ip"; up to twice that while the arrays hold spare capacity: it is doubled when
full, so adding n rows in many calls copies O(n) bytes in all); `remove_ids` compacts
them and refills faiss's lists, O(ntotal). A search changes nothing shared, so searches
may run concurrently; `add` and `remove_ids` must not overlap them.
"""

from __future__ import annotations

from typing import Any, Literal, cast

import numpy as np

from qinco_jax import aq, data


def _faiss():
  import faiss
  return faiss


METRICS = {"l2": lambda: _faiss().METRIC_L2, "ip": lambda: _faiss().METRIC_INNER_PRODUCT}
N_LEVELS = 256  # levels of the stored norm term v (one byte)
FLAT_COARSE_MAX = 4096  # coarse="auto": exact list search up to this many lists
LOAD_ROWS = 1 << 20  # `from_arrays` widens (to int64) and checks this many rows at a time
Coarse = Literal["auto", "flat", "hnsw"]


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


class IVFIndex:
  """Inverted lists of QINCo2 codes with the per-query-table scan (module docstring).

  Built by `build_index`; rows are appended by `add` and dropped by `remove_ids`.

  Attributes:
    centroids: (K_IVF, D) float32 raw IVF centroids.
    tables: (M, 256, D) float32 AQ tables.
    levels: (256,) float32 levels of v (empty for metric "ip").
    metric: "l2" or "ip".
    lists: (n,) int32 list of each row; codes: (n, M) uint8; ids: (n,) int64.
  """

  def __init__(self, centroids, tables, levels, metric: Literal["l2", "ip"] = "l2",
               ef_construction: int = 20, coarse: Coarse | object = "auto"):
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
    # Row storage with spare capacity (doubled when full), so that adding n rows in
    # many calls copies O(n) bytes in all; `lists`, `codes`, `ids` are views of the
    # first `ntotal` rows. "ip" stores no norm byte, so it has no "vcodes" buffer.
    self._n = 0
    self._buf: dict[str, np.ndarray] = {
        "lists": np.zeros(0, np.int32), "codes": np.zeros((0, M), np.uint8),
        "ids": np.zeros(0, np.int64)}
    if metric == "l2":
      self._buf["vcodes"] = np.zeros(0, np.uint8)
    if coarse == "auto":
      coarse = "flat" if K_ivf <= FLAT_COARSE_MAX else "hnsw"
    self.coarse: Any  # a faiss index over the raw centroids
    if coarse == "flat":
      self.coarse = faiss.IndexFlat(D, METRICS[metric]())
    elif coarse == "hnsw":
      self.coarse = faiss.IndexHNSWFlat(D, 32, METRICS[metric]())
      self.coarse.hnsw.efConstruction = ef_construction
    elif isinstance(coarse, str):
      raise ValueError(f"coarse must be 'auto', 'flat' or 'hnsw', got {coarse!r}")
    else:
      self.coarse = coarse  # deserialised (`from_arrays`), centroids already in
    if isinstance(coarse, str):
      self.coarse.add(self.centroids)
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
    self.scan = faiss.IndexIVFPQ(self._quantizer, self._D_lift, K_ivf, M + nb, 8,
                                 faiss.METRIC_INNER_PRODUCT)
    self.scan.by_residual = True  # adds the list term <q', c'_l>
    cb = np.zeros((M + nb, 256, D), np.float32)
    cb[:M] = self.tables
    if nb:
      cb[M, :, 0] = self.levels
    faiss.copy_array_to_vector(cb.ravel(), self.scan.pq.centroids)
    self.scan.is_trained = True

  # ------------------------------------------------------------------ sizes
  @property
  def ntotal(self) -> int:
    return self._n

  @property
  def lists(self) -> np.ndarray:
    """(ntotal,) int32: the inverted list of each row."""
    return self._buf["lists"][:self._n]

  @property
  def codes(self) -> np.ndarray:
    """(ntotal, M) uint8: the codes of each row."""
    return self._buf["codes"][:self._n]

  @property
  def ids(self) -> np.ndarray:
    """(ntotal,) int64: the id of each row."""
    return self._buf["ids"][:self._n]

  @property
  def _vcodes(self) -> np.ndarray:
    """(ntotal,) uint8 norm bytes ("l2"; empty for "ip")."""
    return self._buf["vcodes"][:self._n] if "vcodes" in self._buf else np.zeros(0, np.uint8)

  def _reserve(self, rows: int) -> None:
    """Makes room for `rows` rows in all (a no-op when there is room already)."""
    for name, buf in self._buf.items():
      if len(buf) < rows:
        grown = np.zeros((rows,) + buf.shape[1:], buf.dtype)
        grown[:self._n] = buf[:self._n]
        self._buf[name] = grown

  def _append(self, **rows: np.ndarray) -> None:
    """Writes rows (one array per buffer) after the last one, growing the buffers
    geometrically."""
    need = self._n + len(rows["ids"])
    if len(self._buf["ids"]) < need:
      self._reserve(max(need, 2 * len(self._buf["ids"]), 1024))
    for name, v in rows.items():
      self._buf[name][self._n:need] = v
    self._n = need

  def _keep(self, keep: np.ndarray) -> None:
    """Keeps the rows where `keep` (ntotal,) is True, in order (compact copies)."""
    self._buf = {k: v[:self._n][keep] for k, v in self._buf.items()}
    self._n = int(keep.sum())

  @property
  def nlist(self) -> int:
    return len(self.centroids)

  @property
  def exact_coarse(self) -> bool:
    """True when lists are chosen by an exact search (efSearch plays no part)."""
    return not isinstance(self.coarse, _faiss().IndexHNSW)

  @property
  def M(self) -> int:
    return self.tables.shape[0]

  # ------------------------------------------------------------------ content
  def add(self, codes: np.ndarray, ids: np.ndarray | None = None, chunk: int = 1 << 18,
          vcodes: np.ndarray | None = None):
    """Appends precomputed codes (n, M + 1) (column 0: list id) under ids (n,) int64
    (default ntotal, ntotal + 1, ...). Nothing is re-encoded. `vcodes` (n,) uint8 are
    the norm bytes if known (`from_arrays`); otherwise they are computed."""
    codes = data.check_int_matrix(codes, "codes")
    if codes.shape[1] != self.M + 1:
      raise ValueError(f"codes must be (n, {self.M + 1}) (IVF id + M codes), got "
                       f"{codes.shape}")
    if len(codes) and (codes[:, 0].max() >= self.nlist or codes[:, 1:].max() >= 256):
      raise ValueError(f"codes: list ids must lie in 0..{self.nlist - 1} and codes in "
                       f"0..255, got maxima {codes[:, 0].max()} and {codes[:, 1:].max()}")
    n = len(codes)
    ids = np.arange(self.ntotal, self.ntotal + n) if ids is None else np.asarray(ids)
    if ids.shape != (n,) or ids.dtype.kind not in "iu":
      raise ValueError(f"ids: expected ({n},) integers (one per row of codes), got shape "
                       f"{ids.shape} dtype {ids.dtype}")
    if n and ids.min() < 0:
      raise ValueError(f"ids must be >= 0 (-1 marks a missing result), got {ids.min()}")
    rows = {"lists": codes[:, 0], "codes": codes[:, 1:], "ids": ids.astype(np.int64)}
    if self.metric == "l2":  # the norm byte
      if vcodes is None:
        vcodes = np.concatenate([np.zeros(0, np.uint8)] + [
            quantize_levels(norm_term(self.centroids, self.tables, codes[s:s + chunk]),
                            self.levels) for s in range(0, n, chunk)])
      elif np.shape(vcodes) != (n,):
        raise ValueError(f"vcodes: expected shape ({n},), got {np.shape(vcodes)}")
      rows["vcodes"] = vcodes
    start = self.ntotal
    self._append(**rows)
    self._fill(np.arange(start, start + n, dtype=np.int64))

  def _fill(self, rows: np.ndarray):
    """Adds these rows to faiss's inverted lists (labels = row numbers)."""
    faiss = _faiss()
    packed = self.codes[rows]
    if self.metric == "l2":
      packed = np.concatenate([packed, self._vcodes[rows, None]], 1)
    lists = self.lists[rows]
    order = np.argsort(lists, kind="stable")
    bounds = np.searchsorted(lists[order], np.arange(self.nlist + 1))
    for l in np.flatnonzero(np.diff(bounds)):
      sel = order[bounds[l]:bounds[l + 1]]
      lab = np.ascontiguousarray(rows[sel])
      lc = np.ascontiguousarray(packed[sel])
      self.scan.invlists.add_entries(int(l), len(sel), faiss.swig_ptr(lab),
                                     faiss.swig_ptr(lc))
    self.scan.ntotal = self.ntotal

  def remove_ids(self, ids) -> int:
    """Drops the rows holding these ids; returns how many were removed."""
    drop = np.isin(self.ids, np.asarray(ids, np.int64).ravel())
    n = int(drop.sum())
    if n:
      self._keep(~drop)
      self.scan.reset()  # row numbers changed: refill every list
      self._fill(np.arange(self.ntotal, dtype=np.int64))
    return n

  # ------------------------------------------------------------------ search
  def search(self, q: np.ndarray, n: int, nprobe: int, ef_search: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """The n best rows of the nprobe lists nearest each query (AQ distances).

    Args:
      q: (nq, D) float32 raw queries.
      ef_search: efSearch of an HNSW coarse search (a flat one is exact and ignores it).
    Returns:
      D (nq, n) float32: squared distances smallest first ("l2"; inf where fewer
      results) or inner products largest first ("ip"; -inf), and rows (nq, n) int64
      into `lists`, `codes`, `ids` (-1 where fewer results).
    """
    faiss = _faiss()
    q = np.ascontiguousarray(q, np.float32)
    D = self.centroids.shape[1]
    if q.ndim != 2 or q.shape[1] != D:
      raise ValueError(f"queries: expected shape (nq, {D}), got {q.shape}")
    for name, v in (("n", n), ("nprobe", nprobe), ("ef_search", ef_search)):
      if int(v) < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    nq = len(q)
    nprobe = int(min(nprobe, self.nlist))
    hnsw = isinstance(self.coarse, faiss.IndexHNSW)
    Dc, Ic = self.coarse.search(q, nprobe, params=faiss.SearchParametersHNSW(
        efSearch=int(ef_search)) if hnsw else None)
    # Where the graph returns fewer than nprobe lists (id -1), faiss skips the slot.
    lifted = np.zeros((nq, self._D_lift), np.float32)
    lifted[:, :self.M * D] = np.tile(q, (1, self.M))
    if self.metric == "l2":
      lifted[:, self.M * D] = 1.0
    S = np.empty((nq, n), np.float32)
    rows = np.empty((nq, n), np.int64)
    Ic = np.ascontiguousarray(Ic, np.int64)
    Dc = np.ascontiguousarray(Dc, np.float32)
    # nprobe goes in per call: nothing shared is changed, so calls may overlap.
    self.scan.search_preassigned_c(
        nq, faiss.swig_ptr(lifted), int(n), faiss.swig_ptr(Ic), faiss.swig_ptr(Dc),
        faiss.swig_ptr(S), faiss.swig_ptr(rows), False,
        faiss.SearchParametersIVF(nprobe=nprobe))
    missing = rows < 0  # their scores are faiss's heap fill value
    if self.metric == "ip":
      S[missing] = -np.inf
      return S, rows
    qn = (q.astype(np.float64) ** 2).sum(1, keepdims=True)
    dist = (qn - 2.0 * np.where(missing, 0.0, S)).astype(np.float32)
    dist[missing] = np.inf
    return dist, rows

  # ------------------------------------------------------------------ files
  def arrays(self) -> dict[str, Any]:
    """Everything needed to rebuild this index (`from_arrays`)."""
    faiss = _faiss()
    return {"centroids": self.centroids, "tables": self.tables, "levels": self.levels,
            "lists": self.lists, "codes": self.codes, "ids": self.ids,
            "vcodes": self._vcodes, "metric": np.array(self.metric),
            "coarse": faiss.serialize_index(self.coarse)}

  @classmethod
  def from_arrays(cls, a) -> IVFIndex:
    faiss = _faiss()
    metric = cast(Literal["l2", "ip"], str(a["metric"]))
    index = cls(a["centroids"], a["tables"], a["levels"], metric,
                coarse=faiss.deserialize_index(np.asarray(a["coarse"])))
    lists, codes, ids = (np.asarray(a[k]) for k in ("lists", "codes", "ids"))
    vcodes = np.asarray(a["vcodes"]) if "vcodes" in a and metric == "l2" else None
    index._reserve(len(ids))
    for s in range(0, len(ids), LOAD_ROWS):
      e = s + LOAD_ROWS
      index.add(np.concatenate([lists[s:e, None].astype(np.int64),
                                codes[s:e].astype(np.int64)], 1), ids[s:e],
                vcodes=None if vcodes is None else vcodes[s:e])
    return index


def build_index(centroids: np.ndarray, tables: np.ndarray, train_codes: np.ndarray,
                db_codes: np.ndarray, db_ids: np.ndarray | None = None,
                ef_construction: int = 20, metric: Literal["l2", "ip"] = "l2",
                coarse: Coarse = "auto") -> IVFIndex:
  """Builds the searchable index from precomputed codes.

  Args:
    centroids: (K_IVF, D) raw IVF centroids.
    tables: (M, K, D) least-squares AQ tables (raw residual units), K = 256.
    train_codes: (n_t, M + 1) codes of training vectors (the levels of v are fitted on
      their reconstructions).
    db_codes: (n, M + 1) int codes of the database; column 0 = IVF list id.
    db_ids: (n,) int64 database ids (default 0..n-1).
    metric: "l2" (squared distances) or "ip" (inner products).
    coarse: how lists are chosen: "flat" (exact), "hnsw" (a graph, efSearch per call)
      or "auto" (flat up to FLAT_COARSE_MAX lists).
  Returns:
    an `IVFIndex` (ntotal = n).
  """
  M = np.shape(tables)[0]
  for name, c in (("train_codes", train_codes), ("db_codes", db_codes)):
    if np.ndim(c) != 2 or np.shape(c)[1] != M + 1:
      raise ValueError(f"{name} must be (n, {M + 1}) (IVF id + M codes), got {np.shape(c)}")
  levels = np.zeros(N_LEVELS, np.float32)
  if metric == "l2":
    if not len(train_codes):
      raise ValueError("train_codes: need at least one row to fit the norm levels")
    levels = fit_levels(norm_term(centroids, tables, np.asarray(train_codes)))
  index = IVFIndex(centroids, tables, levels, metric, ef_construction, coarse)
  index.add(db_codes, db_ids)
  return index


def from_faiss_ivf_rq(old, centroids: np.ndarray, tables: np.ndarray,
                      metric: Literal["l2", "ip"]) -> IVFIndex:
  """Converts an index saved by qinco-jax before the per-query-table scan (a faiss
  `IVF{K}_HNSW32,RQ{M}x8_Nqint8` holding the codes) into an `IVFIndex` with the same
  codes and ids; the levels of v are fitted on (a sample of) the stored codes. Save the
  result again to skip the conversion on later loads."""
  faiss = _faiss()
  ivf = faiss.downcast_index(faiss.extract_index_ivf(old))
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


__all__ = ["IVFIndex", "build_index", "fit_levels", "quantize_levels", "norm_term",
           "from_faiss_ivf_rq"]
