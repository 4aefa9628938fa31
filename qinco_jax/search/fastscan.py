"""A fast-scan first stage for 4-bit codes (K = 16): faiss's own SIMD scanner over our
AQ tables and our QINCo2 codes, with no second code stored and nothing re-encoded.

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
"""

from __future__ import annotations

import numpy as np

from qinco_jax import aq, data

KSUB = 16  # codewords per table: 4-bit codes
BBS = 32  # vectors per packed block (faiss's default)


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
  nib = np.concatenate([codes, ncodes], 1).astype(np.uint8)
  if nib.shape[1] % 2:
    nib = np.concatenate([nib, np.zeros((len(nib), 1), np.uint8)], 1)
  return nib[:, 0::2] | (nib[:, 1::2] << 4)


class FastScanLists:
  """Inverted lists of K = 16 codes scanned by faiss's IVF additive fast-scan.

  Attributes:
    index: the faiss `IndexIVFResidualQuantizerFastScan` (L2, by residual).
    centroids: (K_IVF, D) float32 raw IVF centroids.
    tables: (M, 16, D) float32 AQ tables.
    norm_tabs: (32,) float32 levels of the norm codes.
  """

  def __init__(self, centroids, tables, train_codes, bbs: int = BBS, lifted: bool = True):
    """Args:
      centroids: (K_IVF, D) raw IVF centroids.
      tables: (M, 16, D) least-squares AQ tables (`aq.fit_aq`).
      train_codes: (n, M + 1) codes (column 0: list id) whose reconstructions'
        squared norms train the norm quantiser.
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
    self.lifted = bool(lifted)
    self.coarse = faiss.IndexFlatL2(D)  # chooses the lists (exactly)
    self.coarse.add(self.centroids)
    # The scanner's quantiser only reconstructs c' for the bias -2 <q', c'>.
    cl, tl, self.D_scan = self.centroids, self.tables, D
    if self.lifted:  # q' = [q, 1], c' = [c, -||c||^2 / 2], tables with a 0 coordinate
      sq = (self.centroids.astype(np.float64) ** 2).sum(1, keepdims=True)
      cl = np.concatenate([cl, (-0.5 * sq).astype(np.float32)], 1)
      tl = np.concatenate([tl, np.zeros((M, K, 1), np.float32)], 2)
      self.D_scan = D + 1
    self.quantizer = faiss.IndexFlatL2(self.D_scan)
    self.quantizer.add(np.ascontiguousarray(cl))
    self.index = faiss.IndexIVFResidualQuantizerFastScan(
        self.quantizer, self.D_scan, nlist, M, 4, faiss.METRIC_L2,
        faiss.AdditiveQuantizer.ST_norm_rq2x4, bbs)
    rq = self.index.rq
    faiss.copy_array_to_vector(np.ascontiguousarray(tl).ravel(), rq.codebooks)
    rq.is_trained = True
    norms = self.norm_values(train_codes).astype(np.float32)
    rq.train_norm(len(norms), faiss.swig_ptr(norms))
    self.norm_tabs = faiss.vector_to_array(rq.norm_tabs).astype(np.float32)
    self.index.is_trained = True
    self.packer = self.index.get_CodePacker()
    self.invlists = faiss.downcast_InvertedLists(self.index.invlists)

  @property
  def M(self) -> int:
    return self.tables.shape[0]

  def norm_values(self, codes: np.ndarray) -> np.ndarray:
    """What the norm codes quantise for codes (n, M + 1): ||c_l + x_hat||^2, minus
    ||c_l||^2 when lifted; float64."""
    c = self.centroids[codes[:, 0]].astype(np.float64)
    r = c + aq.aq_decode(self.tables, codes[:, 1:])
    return (r * r).sum(1) - ((c * c).sum(1) if self.lifted else 0.0)

  def add(self, codes: np.ndarray, ids: np.ndarray) -> None:
    """Appends codes (n, M + 1) (column 0: list id, then M codes in 0..15) under ids
    (n,) int64."""
    faiss = _faiss()
    codes = data.check_int_matrix(codes, "codes")
    if codes.shape[1] != self.M + 1:
      raise ValueError(f"codes must be (n, {self.M + 1}) (IVF id + M codes), got {codes.shape}")
    if len(codes) and (codes[:, 0].max() >= len(self.centroids) or codes[:, 1:].max() >= KSUB):
      raise ValueError(f"codes: list ids must lie in 0..{len(self.centroids) - 1} and codes in "
                       f"0..{KSUB - 1}, got maxima {codes[:, 0].max()} and {codes[:, 1:].max()}")
    ids = np.ascontiguousarray(ids, np.int64)
    if ids.shape != (len(codes),):
      raise ValueError(f"ids: expected ({len(codes)},) integers, got shape {ids.shape}")
    fc = flat_codes(codes[:, 1:], norm_codes(self.norm_values(codes), self.norm_tabs))
    pk = self.packer
    lists = codes[:, 0].astype(np.int64)
    for l in np.unique(lists):
      sel = np.flatnonzero(lists == l)
      n = len(sel)
      nblk = -(-n // pk.nvec)
      buf = np.zeros((nblk * pk.nvec, pk.code_size), np.uint8)
      buf[:n] = fc[sel]
      blocks = np.zeros(nblk * pk.block_size, np.uint8)
      for b in range(nblk):
        pk.pack_all(faiss.swig_ptr(buf[b * pk.nvec:]), faiss.swig_ptr(blocks[b * pk.block_size:]))
      sel_ids = ids[sel]  # held: swig_ptr keeps no reference to its array
      self.invlists.add_entries(int(l), n, faiss.swig_ptr(sel_ids), faiss.swig_ptr(blocks))
    self.index.ntotal += len(codes)

  def search(self, q: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (approximate squared L2, ids) per query, ascending; (nq, k) each."""
    q = np.ascontiguousarray(q, np.float32)
    self.index.nprobe = int(nprobe)
    Dc, Ic = self.coarse.search(q, int(nprobe))
    ql = np.concatenate([q, np.ones((len(q), 1), np.float32)], 1) if self.lifted else q
    dist, ids = self.index.search_preassigned(np.ascontiguousarray(ql), k, Ic, Dc)
    return dist + (q.astype(np.float64) ** 2).sum(1, keepdims=True), ids

  def lut_error_bound(self, q: np.ndarray, nprobe: int | None = None) -> np.ndarray:
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


__all__ = ["FastScanLists", "flat_codes", "norm_codes"]
