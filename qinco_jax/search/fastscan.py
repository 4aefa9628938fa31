"""The inverted lists of 4-bit codes (K = 16), scanned by faiss's own SIMD fast-scan over
our AQ tables and our QINCo2 codes, with no second code stored and nothing re-encoded.

`FastScanLists` has the interface of `lists.IVFIndex` (add, remove_ids, assign, scan,
search, save, open), so `Index`, `Searcher`, the build stage and the served parts use
either; `empty_lists` and `open_lists` choose by the codes' K. The later stages (the
pairwise shortlist and the QINCo2 re-rank) are the same for both.

faiss's `IndexIVFResidualQuantizerFastScan` (the "IVF..,RQ{M}x4fsr_Nrq2x4" family) ranks a
vector stored in list l with 4-bit codes i_1..i_M and a 2 x 4-bit norm code by

    -2 <q, c_l> - 2 sum_m <q, T_m[i_m]> + N_0[n_0] + N_1[n_1]
    ~= ||q - c_l - x_hat||^2 - ||q||^2,        x_hat = sum_m T_m[i_m],

where N_0[n_0] + N_1[n_1] quantises ||c_l + x_hat||^2 (a two-stage scalar residual
quantiser of 16 levels each, faiss's "Nrq2x4"). The per-query table <q, T_m[k]> is the
same for every list (the list term -2 <q, c_l> is a per-list bias), exactly as in
`lists.IVFIndex`. The scanner rounds the table to 8 bits per query (faiss's
`round_uint8_per_column`: each of the M + 2 sub-tables shifted by its minimum, all scaled
by a = 255 / (largest sub-table span)) and sums 4 bits at a time with SIMD shuffles; the
bias is rounded with the same scale. So its distances equal the float ones from the same
tables up to (M + 3) / (2 a) (`lut_error_bound`).

faiss's norm term ||c_l + x_hat||^2 carries ||c_l||^2, which varies far more across lists
than the rest, so its 2 x 4-bit code is coarse and its sub-tables' span sets the 8-bit
table's scale for every sub-table. `FastScanLists(lifted=True)` (the default) stores
v = ||c_l + x_hat||^2 - ||c_l||^2 = 2 <c_l, x_hat> + ||x_hat||^2 instead and moves
||c_l||^2 into the per-list bias, as `lists.IVFIndex` does: the scanner works in D + 1
dimensions with q' = [q, 1], c'_l = [c_l, -||c_l||^2 / 2] and tables [T_m, 0], so
-2 <q', c'_l> = -2 <q, c_l> + ||c_l||^2. Lists are chosen by an exact search over the raw
centroids and handed to faiss's `search_preassigned` (the lifted centroids would choose
wrong ones). faiss's own remedy, `rescale_norm` / `norm_scale`, is applied only by its
`search`, not by `search_preassigned`.

How our tables and codes are loaded (faiss 1.15; `FastScanLists`):
  * the residual quantiser's `codebooks` are overwritten with the least-squares AQ tables
    (M, 16, D) (spec 12.1; no faiss training of the quantiser), and its norm quantiser is
    trained (`train_norm`) on ||c_l + x_hat||^2 of training codes;
  * each list's codes are written as faiss's flat codes (M + 2 nibbles, low nibble first:
    the M codes, then the two norm codes), packed 32 vectors per block with the index's
    `CodePacker` (`pack_all`), and appended with `BlockInvertedLists.add_entries` -- which
    takes *packed blocks* (it re-packs them itself behind a partly filled last block);
    `IndexIVF.add_sa_codes` hands it one unpacked code and corrupts memory (faiss
    1.15.1), so it must not be used on these indexes;
  * the norm codes are chosen here, exhaustively over the 16 x 16 pairs.

Storage: faiss keeps the packed blocks in memory (its block lists cannot be memory-
mapped), labelled by row number; the rows (list int32, M codes uint8, 2 norm codes
uint8, id int64) are kept beside them for the later stages. In memory that is
(M + 2) / 2 bytes per vector in faiss's blocks (plus its 8-byte label) and M + 14 in
the rows. Saved, the list file holds each vector's faiss flat code ((M + 2) / 2 bytes,
rounded up) and id in `listfile`'s layout, so the build stage streams and merges
them as it does 8-bit lists; `open_lists` reads them back into memory (O(ntotal)).
Metric: L2 only (cosine is L2 on unit vectors; `Index` refuses "ip" at K = 16).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from qinco_jax import aq, packing
from qinco_jax.search import coarse as coarse_lib
from qinco_jax.search import listfile
from qinco_jax.search import lists as lists_lib

KSUB = 16  # codewords per table: 4-bit codes
BBS = 32  # vectors per packed block (faiss's default)
KIND = "fastscan"  # lists.json "kind" of saved fast-scan lists


def _faiss():
  import faiss
  return faiss


def norm_codes(norms: np.ndarray, norm_tabs: np.ndarray) -> np.ndarray:
  """The best of the 16 x 16 norm-code pairs for each squared norm.

  Args:
    norms: (n,) squared norms ||c_l + x_hat||^2.
    norm_tabs: (32,) the two 16-level tables of faiss's "Nrq2x4" norm quantiser.

  Returns:
    (n, 2) uint8 codes (n_0, n_1) minimising |norm - N_0[n_0] - N_1[n_1]|.
  """
  t = np.asarray(norm_tabs, np.float64).reshape(2, KSUB)
  pair = (t[0][:, None] + t[1][None, :]).ravel()  # index n_0 * 16 + n_1
  order = np.argsort(pair)
  s = pair[order]
  v = np.asarray(norms, np.float64).ravel()
  j = np.clip(np.searchsorted(s, v), 1, len(s) - 1)
  j -= (v - s[j - 1] <= s[j] - v)  # the nearer neighbour
  best = order[j]
  return np.stack([best // KSUB, best % KSUB], 1).astype(np.uint8)


def flat_codes(codes: np.ndarray, ncodes: np.ndarray) -> np.ndarray:
  """faiss's flat code of each vector: M + 2 nibbles (the M codes, then the two norm
  codes), nibble j in bits 4j..4j+3 (low nibble first).

  Args:
    codes: (n, M) integer codes in 0..15.
    ncodes: (n, 2) norm codes in 0..15.

  Returns:
    (n, ceil((M + 2) / 2)) uint8.
  """
  nib = np.concatenate([codes, ncodes], 1)
  return packing.pack_fields(nib, [4] * nib.shape[1])  # the same nibble layout


def split_flat_codes(fc: np.ndarray, M: int) -> tuple[np.ndarray, np.ndarray]:
  """Inverse of `flat_codes`: (codes (n, M) uint8, norm codes (n, 2) uint8)."""
  nib = packing.unpack_fields(fc, [4] * (M + 2)).astype(np.uint8)
  return nib[:, :M], nib[:, M:]


class FastScanLists(lists_lib.ListsBase):
  """Inverted lists of K = 16 codes scanned by faiss's IVF additive fast-scan, with the
  interface of `lists.IVFIndex` (module docstring).

  Attributes:
    index: the faiss `IndexIVFResidualQuantizerFastScan` (L2, by residual).
    centroids: (K_IVF, D) float32 raw IVF centroids.
    tables: (M, 16, D) float32 AQ tables.
    norm_tabs: (32,) float32 levels of the two norm codes (also `levels`).
    coarse: the faiss index choosing the lists (over the raw centroids).
    next_id: the first id of an `add` without ids.
  """

  metric = "l2"
  disk = None  # never memory-mapped: faiss's block lists live in memory

  def __init__(self, centroids, tables, train_codes=None, *, norm_tabs=None,
               coarse: Any = "auto", ef_construction: int = lists_lib.EF_CONSTRUCTION,
               bbs: int = BBS, lifted: bool = True):
    """Args:
      centroids: (K_IVF, D) raw IVF centroids.
      tables: (M, 16, D) least-squares AQ tables (`aq.fit_aq`).
      train_codes: (n, M + 1) codes (column 0: list id) whose reconstructions'
        squared norms train the norm quantiser; or
      norm_tabs: (32,) its levels, trained already (a saved index).
      coarse: how lists are chosen, as `lists.IVFIndex`'s ("auto", "flat", "hnsw" or
        a faiss index over the raw centroids).
      bbs: vectors per packed block (a multiple of 32).
      lifted: store v = ||c_l + x_hat||^2 - ||c_l||^2 in the norm codes and move
        ||c_l||^2 into the per-list bias (module docstring), instead of faiss's
        ||c_l + x_hat||^2, whose range across lists coarsens the 8-bit table.
    """
    faiss = _faiss()
    self.centroids = np.ascontiguousarray(centroids, np.float32)
    self.tables = np.ascontiguousarray(tables, np.float32)
    nlist, D = self.centroids.shape
    M, K, Dt = self.tables.shape
    if K != KSUB or Dt != D:
      raise ValueError(f"tables must be (M, {KSUB}, {D}) (4-bit codes), got "
                       f"{self.tables.shape}")
    self.lifted, self.bbs = bool(lifted), int(bbs)
    given: Any = coarse
    self.coarse: Any = (coarse_lib.build_coarse(self.centroids, given, ef_construction, "l2")
                        if isinstance(given, str) else given)
    if self.coarse.ntotal != nlist or self.coarse.d != D or (
        self.coarse.metric_type != faiss.METRIC_L2):
      raise ValueError(f"coarse index: expected {nlist} centroids of dimension {D} and "
                       f"metric l2, got {self.coarse.ntotal} of {self.coarse.d}")
    # The scanner's quantiser only reconstructs c' for the bias -2 <q', c'>.
    cl, tl, self.D_scan = self.centroids, self.tables, D
    if self.lifted:  # q' = [q, 1], c' = [c, -||c||^2 / 2], tables with a 0 coordinate
      sq = (self.centroids.astype(np.float64) ** 2).sum(1, keepdims=True)
      cl = np.concatenate([cl, (-0.5 * sq).astype(np.float32)], 1)
      tl = np.concatenate([tl, np.zeros((M, K, 1), np.float32)], 2)
      self.D_scan = D + 1
    # One more list than centroids, always empty: it stands in for the -1 entries of
    # a list search that found fewer lists (faiss's fast-scan reads a list -1 as a
    # real one, with results that vary from run to run).
    self.quantizer = faiss.IndexFlatL2(self.D_scan)
    self.quantizer.add(np.ascontiguousarray(np.concatenate([cl, cl[:1]])))
    self.index = faiss.IndexIVFResidualQuantizerFastScan(
        self.quantizer, self.D_scan, nlist + 1, M, 4, faiss.METRIC_L2,
        faiss.AdditiveQuantizer.ST_norm_rq2x4, self.bbs)
    rq = self.index.rq
    faiss.copy_array_to_vector(np.ascontiguousarray(tl).ravel(), rq.codebooks)
    rq.is_trained = True
    if norm_tabs is None:
      if train_codes is None or not len(train_codes):
        raise ValueError("train_codes: need at least one row to fit the norm codes")
      train_codes = lists_lib.check_codes(train_codes, M, nlist, "train_codes", K=KSUB)
      norms = self.norm_values(train_codes).astype(np.float32)
      rq.train_norm(len(norms), faiss.swig_ptr(norms))
    else:
      norm_tabs = np.ascontiguousarray(norm_tabs, np.float32).ravel()
      if norm_tabs.shape != (2 * KSUB,):
        raise ValueError(f"norm_tabs must be ({2 * KSUB},), got {norm_tabs.shape}")
      faiss.copy_array_to_vector(norm_tabs, rq.norm_tabs)
    self.norm_tabs = faiss.vector_to_array(rq.norm_tabs).astype(np.float32)
    self.index.is_trained = True
    self.packer = self.index.get_CodePacker()
    self.invlists = faiss.downcast_InvertedLists(self.index.invlists)
    self.next_id = 0
    self._rows = lists_lib.RowStore(
        lists=np.zeros(0, np.int32), codes=np.zeros((0, M), np.uint8),
        ncodes=np.zeros((0, 2), np.uint8), ids=np.zeros(0, np.int64))

  # ------------------------------------------------------------------ sizes
  K = KSUB
  levels = property(lambda self: self.norm_tabs)  # what a served part's fingerprint reads

  @property
  def ntotal(self) -> int:
    return self._rows.n

  @property
  def code_size(self) -> int:
    """Bytes per vector in the list file: faiss's flat code, M + 2 nibbles."""
    return (self.M + 3) // 2

  def rows(self) -> dict[str, np.ndarray]:
    """Every stored row (views in row order): "lists" (n,) int32, "codes" (n, M) uint8,
    "ncodes" (n, 2) uint8 norm codes and "ids" (n,) int64."""
    return self._rows.view()

  def norm_values(self, codes: np.ndarray) -> np.ndarray:
    """What the norm codes quantise for codes (n, M + 1): ||c_l + x_hat||^2, minus
    ||c_l||^2 when lifted; float64."""
    v = -2.0 * lists_lib.norm_term(self.centroids, self.tables, codes)  # 2<c, x> + |x|^2
    if self.lifted:
      return v
    return v + (self.centroids[codes[:, 0]].astype(np.float64) ** 2).sum(1)

  def norm_code_pairs(self, codes: np.ndarray, chunk: int = 1 << 15) -> np.ndarray:
    """The 2 x 4-bit norm codes of codes (n, M + 1): (n, 2) uint8."""
    return np.concatenate([np.zeros((0, 2), np.uint8)] + [
        norm_codes(self.norm_values(codes[s:s + chunk]), self.norm_tabs)
        for s in range(0, len(codes), chunk)])

  def list_codes(self, codes: np.ndarray) -> np.ndarray:
    """What the list file stores for codes (n, M + 1) (checked): (n, code_size) uint8
    faiss flat codes, norm codes computed."""
    return flat_codes(codes[:, 1:], self.norm_code_pairs(codes))

  # ------------------------------------------------------------------ content
  def add(self, codes: np.ndarray, ids: np.ndarray | None = None,
          ncodes: np.ndarray | None = None):
    """Appends codes (n, M + 1) (column 0: list id, then M codes in 0..15) under ids
    (n,) integers in 0..2**63-1 (default next_id, next_id + 1, ...). `ncodes`: their
    (n, 2) norm codes if known (computed otherwise)."""
    codes = lists_lib.check_codes(codes, self.M, self.nlist, K=KSUB)
    n = len(codes)
    ids = (np.arange(self.next_id, self.next_id + n, dtype=np.int64) if ids is None
           else lists_lib.check_ids(ids, n))
    if ncodes is None:
      ncodes = self.norm_code_pairs(codes)
    elif np.shape(ncodes) != (n, 2):
      raise ValueError(f"ncodes: expected shape ({n}, 2), got {np.shape(ncodes)}")
    self._fill(self._rows.append(lists=codes[:, 0], codes=codes[:, 1:], ncodes=ncodes,
                                 ids=ids))
    if n:
      self.next_id = max(self.next_id, int(ids.max()) + 1)

  def remove_ids(self, ids) -> int:
    """Drops the rows holding these ids ((n,) integers); returns how many were removed.
    O(ntotal): the rows are compacted and faiss's lists refilled."""
    n = self._rows.drop_ids(lists_lib.removal_ids(ids))
    if n:
      self.index.reset()  # row numbers changed: refill every list
      self._fill(np.arange(self._rows.n, dtype=np.int64))
    return n

  def to_memory(self) -> None:
    """A no-op: these lists are always in memory."""

  def _fill(self, rows: np.ndarray) -> None:
    """Appends these rows to faiss's block lists, labelled by row number: per list,
    their flat codes packed 32 at a time with the index's CodePacker, then
    `add_entries` (never `add_sa_codes`: module docstring)."""
    if not len(rows):
      return
    faiss = _faiss()
    lists = self._rows.buf["lists"][rows]
    order = np.argsort(lists, kind="stable")
    rows, lists = rows[order], lists[order]
    fc = flat_codes(self._rows.buf["codes"][rows], self._rows.buf["ncodes"][rows])
    pk = self.packer
    cut = np.flatnonzero(np.diff(lists)) + 1
    for a, b in zip(np.concatenate([[0], cut]), np.concatenate([cut, [len(rows)]])):
      n = int(b - a)
      nblk = -(-n // pk.nvec)
      buf = np.zeros((nblk * pk.nvec, pk.code_size), np.uint8)
      buf[:n] = fc[a:b]
      blocks = np.zeros(nblk * pk.block_size, np.uint8)
      for k in range(nblk):
        pk.pack_all(faiss.swig_ptr(buf[k * pk.nvec:]), faiss.swig_ptr(blocks[k * pk.block_size:]))
      labels = np.ascontiguousarray(rows[a:b])  # held: swig_ptr keeps no reference
      self.invlists.add_entries(int(lists[a]), n, faiss.swig_ptr(labels),
                                faiss.swig_ptr(blocks))
    self.index.ntotal += len(rows)

  # ------------------------------------------------------------------ search
  def scan(self, q: np.ndarray, Dc: np.ndarray, Ic: np.ndarray, n: int):
    """The n best rows of the given lists of each query, as `lists.IVFIndex.scan`:
    D (nq, n) float32 approximate squared distances (inf where fewer results), lists
    (nq, n) int64, codes (nq, n, M) uint8 and ids (nq, n) int64 (-1 where fewer)."""
    faiss = _faiss()
    q = np.ascontiguousarray(q, np.float32)
    nq = len(q)
    Ic = np.ascontiguousarray(np.where(Ic < 0, self.nlist, Ic), np.int64)  # the empty list
    Dc = np.ascontiguousarray(Dc, np.float32)
    ql = np.concatenate([q, np.ones((nq, 1), np.float32)], 1) if self.lifted else q
    S = np.empty((nq, n), np.float32)
    labels = np.empty((nq, n), np.int64)
    # nprobe goes in per call: nothing shared is changed, so calls may overlap.
    self.index.search_preassigned_c(
        nq, faiss.swig_ptr(np.ascontiguousarray(ql)), int(n), faiss.swig_ptr(Ic),
        faiss.swig_ptr(Dc), faiss.swig_ptr(S), faiss.swig_ptr(labels), False,
        faiss.SearchParametersIVF(nprobe=int(Ic.shape[1])))
    found = labels >= 0
    lab = np.where(found, labels, 0).ravel()
    lists = np.where(found, self._rows.buf["lists"][lab].reshape(nq, n), -1).astype(np.int64)
    ids = np.where(found, self._rows.buf["ids"][lab].reshape(nq, n), -1)
    codes = self._rows.buf["codes"][lab].reshape(nq, n, self.M)
    dist = (S + (q.astype(np.float64) ** 2).sum(1, keepdims=True)).astype(np.float32)
    dist[~found] = np.inf
    return dist, lists, codes, ids

  def lut_error_bound(self, q: np.ndarray) -> np.ndarray:
    """Largest difference, per query, between the scanner's distances and float ones
    from the same tables: (M + 3) / (2 a), a = 255 / largest sub-table span (M AQ
    sub-tables -2 <q, T_m[.]> and 2 norm sub-tables), M + 2 table roundings plus the
    bias. (nq,) float64."""
    lut = -2.0 * np.einsum("qd,mkd->qmk", np.asarray(q, np.float64), self.tables)
    span = np.maximum((lut.max(2) - lut.min(2)).max(1), np.ptp(
        self.norm_tabs.reshape(2, KSUB), axis=1).max())
    return (self.M + 3) * 0.5 * span / 255.0

  def float_distances(self, q: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """float64 (nq, n) distances from the same tables: ||q||^2 - 2 <q, c_l + x_hat> +
    N_0[n_0] + N_1[n_1] (the quantised norm term; + ||c_l||^2 when lifted), the
    scanner's up to its rounding."""
    q = np.asarray(q, np.float64)
    c = self.centroids[codes[:, 0]].astype(np.float64)
    r = c + aq.aq_decode(self.tables, codes[:, 1:])
    nc = norm_codes(self.norm_values(codes), self.norm_tabs).astype(np.int64)
    t = self.norm_tabs.astype(np.float64).reshape(2, KSUB)
    qn = t[0][nc[:, 0]] + t[1][nc[:, 1]] + ((c * c).sum(1) if self.lifted else 0.0)
    return (q * q).sum(1)[:, None] - 2 * q @ r.T + qn[None, :]

  # ------------------------------------------------------------------ files
  def save(self, path: str | os.PathLike, on_rows=None) -> None:
    """Writes the lists to directory `path` (created): the list file (faiss flat codes
    and ids, `listfile` layout), the arrays, the coarse index and lists.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    r = self.rows()
    listfile.write_lists(path / lists_lib.LISTS_FILE, self.nlist, r["lists"],
                         flat_codes(r["codes"], r["ncodes"]), r["ids"], on_rows=on_rows)
    self.save_meta(path)

  def save_meta(self, path: Path) -> None:
    """Everything but the list file."""
    faiss = _faiss()
    for name in ("centroids", "tables", "levels"):
      np.save(path / f"{name}.npy", getattr(self, name), allow_pickle=False)
    faiss.write_index(self.coarse, str(path / "coarse.faiss"))
    meta = {"kind": KIND, "metric": self.metric, "nlist": self.nlist, "M": self.M,
            "code_size": self.code_size, "next_id": self.next_id, "lifted": self.lifted,
            "bbs": self.bbs}
    (path / lists_lib.META_FILE).write_text(json.dumps(meta))

  @classmethod
  def open(cls, path: str | os.PathLike, mmap: bool = True) -> FastScanLists:
    """Reads lists saved by `save` (or written by `search.build`) into memory
    (O(ntotal); `mmap` is accepted for `IVFIndex.open`'s interface: faiss's block
    lists cannot be mapped)."""
    faiss = _faiss()
    path = Path(path)
    try:
      meta = json.loads((path / lists_lib.META_FILE).read_text())
      arrays = {k: np.load(path / f"{k}.npy", allow_pickle=False)
                for k in ("centroids", "tables", "levels")}
      coarse = faiss.read_index(str(path / "coarse.faiss"))
    except (OSError, ValueError, RuntimeError) as e:
      raise ValueError(f"inverted lists {str(path)!r} cannot be read: "
                       f"{str(e).splitlines()[0][:200]}") from None
    index = cls(arrays["centroids"], arrays["tables"], norm_tabs=arrays["levels"],
                coarse=coarse, bbs=int(meta.get("bbs", BBS)),
                lifted=bool(meta.get("lifted", True)))
    index.next_id = int(meta["next_id"])
    lf = listfile.ListFile(path / lists_lib.LISTS_FILE, index.nlist, index.code_size)
    fc, ids = lf.read_lists(0, index.nlist)
    codes, ncodes = split_flat_codes(fc, index.M)
    index._fill(index._rows.append(
        lists=np.repeat(np.arange(index.nlist, dtype=np.int32), lf.sizes), codes=codes,
        ncodes=ncodes, ids=ids))
    return index


Lists = lists_lib.IVFIndex | FastScanLists


def empty_lists(centroids: np.ndarray, tables: np.ndarray, train_codes: np.ndarray,
                metric: str = "l2", ef_construction: int = lists_lib.EF_CONSTRUCTION,
                coarse: Any = "auto") -> Lists:
  """Empty inverted lists for codes of these AQ tables (M, K, D): fast-scan ones for
  K = 16 (L2 only), `lists.IVFIndex` for K = 256."""
  if np.shape(tables)[1] == KSUB:
    if metric != "l2":
      raise ValueError(f"4-bit (K=16) lists are scanned in L2 only, got metric={metric!r}")
    return FastScanLists(centroids, tables, train_codes, coarse=coarse,
                         ef_construction=ef_construction)
  return lists_lib.empty_index(centroids, tables, train_codes, metric,  # type: ignore[arg-type]
                               ef_construction, coarse)


def open_lists(path: str | os.PathLike, mmap: bool = True) -> Lists:
  """Opens saved lists of either kind (their lists.json names it)."""
  try:
    kind = json.loads((Path(path) / lists_lib.META_FILE).read_text()).get("kind")
  except (OSError, ValueError):
    kind = None  # IVFIndex.open names what is wrong
  if kind == KIND:
    return FastScanLists.open(path, mmap)
  return lists_lib.IVFIndex.open(path, mmap)


__all__ = ["FastScanLists", "flat_codes", "split_flat_codes", "norm_codes", "empty_lists",
           "open_lists"]
