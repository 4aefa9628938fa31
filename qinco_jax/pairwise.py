"""Pairwise decoder stage (spec 12.2): additive tables over combined codes of two positions.

A pairwise additive decoder approximates the IVF residual r = x - c_IVF[i_0] as

    r_hat = sum_t T_t[I_{a_t} * K + I_{b_t}],      T_t of shape (K * K, D),

where I_p is the code at position p of an *extended* code: the M QINCo2 codes plus a
few extra codes derived from the IVF list id (`ivf_extra_codes`: the package's residual
k-means, `rq_init.residual_kmeans`, over the IVF centroids weighted by their list
sizes). Each table sees two positions at once, so it captures pairwise dependencies
that a plain additive (AQ) decoder cannot. It sits between the AQ look-up shortlist
and the full neural decoder in the search pipeline.

Tables are chosen greedily (`fit_pairwise`): at each step every pair a < b is fitted
as the per-combined-code mean of the current residual, the pair leaving the lowest MSE
on the first `n_eval` training vectors is kept, and its table is subtracted. MSEs
follow the library convention: squared error summed over dimensions, averaged over
vectors (raw units).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
from tqdm.auto import tqdm

from qinco_jax import data, rq_init

_FORMAT_VERSION = 1
_CAST_CHUNK = 1 << 16


# --------------------------------------------------------------------------------------
# Helpers


def _segment_sum(ids: np.ndarray, values: np.ndarray, n_groups: int,
                 weights: np.ndarray | None = None,
                 dtype: npt.DTypeLike = np.float32) -> np.ndarray:
  """out[g] = sum_{i: ids[i] == g} weights[i] * values[i].

  One pass over the rows through a sparse one-hot product (no sorting, no
  per-dimension loop); falls back to `np.add.at` without scipy.

  Args:
    ids: (n,) int group ids in 0..n_groups-1.
    values: (n, D) real.
    n_groups: number of groups.
    weights: optional (n,) real weights (1 when None).
    dtype: accumulation and output dtype.

  Returns:
    (n_groups, D) array of `dtype`.
  """
  n = len(ids)
  values = np.asarray(values)
  w = np.ones(n, dtype) if weights is None else np.asarray(weights, dtype)
  # Cast chunk by chunk so that e.g. float32 -> float64 never copies all the values.
  step = n if values.dtype == dtype else _CAST_CHUNK
  try:
    import scipy.sparse as sp
  except ImportError:  # pragma: no cover - scipy ships with jax
    sp = None
  out = None
  for s in range(0, n, max(step, 1)):
    v = np.asarray(values[s:s + step], dtype=dtype)
    i = np.asarray(ids[s:s + step], np.int64)
    if sp is None:  # pragma: no cover
      part = np.zeros((n_groups, v.shape[1]), dtype)
      np.add.at(part, i, v * w[s:s + step, None])
    else:
      one_hot_t = sp.csc_matrix((w[s:s + step], i, np.arange(len(i) + 1)),
                                shape=(n_groups, len(i)))
      part = np.asarray(one_hot_t @ v, dtype=dtype)
    if out is None:
      out = part
    else:
      out += part
  return np.zeros((n_groups, values.shape[1]), dtype) if out is None else out


def _atomic_save_npz(path: str, arrays: dict) -> None:
  """Writes an .npz archive to `path` through a temp file and `os.replace`."""
  data.atomic_write(path, lambda f: np.savez(f, **arrays))


# --------------------------------------------------------------------------------------
# Extra codes from the IVF ids (spec 12.2, step 1)


def ivf_extra_codes(centroids: np.ndarray, list_sizes: np.ndarray, n_stages: int = 5,
                    K: int = 256, niter: int = 50, seed: int = 0,
                    verbose: bool = False) -> np.ndarray:
  """Lookup table IVF list id -> n_stages extra codes (spec 12.2, step 1).

  The package's residual k-means (`rq_init.residual_kmeans`) over the IVF centroids
  themselves, each centroid weighted by the number of training vectors in its list:
  stage s minimises sum_i size_i ||r_i - c||^2 over the running residuals r_i, by
  weighted Lloyd from K distinct centroids drawn with probability proportional to
  their size (init "random"), empty clusters re-seeded next to populated ones. The RQ
  initialisation's progressive seeding and splitting of small clusters stay off: on
  the 1,024 GloVe IVF centroids at K=256 (4 centroids per codeword) they leave a
  weighted MSE of 0.234 after 5 stages against 0.162 without (mean of 4 seeds).

  Args:
    centroids: (K_IVF, D) real IVF centroids (raw units).
    list_sizes: (K_IVF,) non-negative integer list sizes, not all zero.
    n_stages: number of extra codes per list (5 in the paper).
    K: codewords per stage (256 in the paper); capped at K_IVF when K_IVF < K, so the
      codes are then in 0..K_IVF-1.
    niter: Lloyd iterations per stage (fewer once Lloyd has converged).
    seed: seed of stage 0's k-means (stage s uses seed + s).
    verbose: show a progress bar.

  Returns:
    (K_IVF, n_stages) uint8 when K <= 256, else int32.

  Raises:
    ValueError: wrong shapes, NaN/inf centroids, negative or all-zero list sizes,
      n_stages, K or niter < 1.
  """
  centroids = data.as_float32(centroids, name="centroids", allow_empty=False)
  list_sizes = np.asarray(list_sizes)
  if list_sizes.ndim != 1 or list_sizes.dtype.kind not in "iu":
    raise ValueError(f"list_sizes: expected a 1-D integer array, got shape "
                     f"{list_sizes.shape} and dtype {list_sizes.dtype}")
  if len(list_sizes) != len(centroids):
    raise ValueError(f"list_sizes: expected one per centroid ({len(centroids)}), got "
                     f"{len(list_sizes)}")
  if (list_sizes < 0).any() or not (list_sizes > 0).any():
    raise ValueError(f"list_sizes: expected non-negative sizes, not all zero, got "
                     f"minimum {list_sizes.min()} and total {list_sizes.sum()}")
  if niter < 1:
    raise ValueError(f"niter must be >= 1, got {niter}")
  codes, _ = rq_init.residual_kmeans(centroids, K, n_stages, n_iter=niter, seed=seed,
                                     weights=list_sizes, init="random", split_iters=0,
                                     verbose=verbose)
  return codes.astype(np.uint8 if K <= 256 else np.int32)


def extended_codes(qinco_codes: np.ndarray, ivf_ids: np.ndarray,
                   extra: np.ndarray) -> np.ndarray:
  """Extended codes for the pairwise decoder: the M QINCo2 codes, then the extra codes.

  Args:
    qinco_codes: (n, M) integer QINCo2 codes (without the IVF column).
    ivf_ids: (n,) integer IVF list ids (column 0 of an IVF codec's codes).
    extra: (K_IVF, n_stages) integer table from `ivf_extra_codes`.

  Returns:
    (n, M + n_stages) int32, `concatenate([qinco_codes, extra[ivf_ids]], axis=1)`.

  Raises:
    ValueError: wrong shapes or dtypes, mismatched row counts, list ids out of range.
  """
  qinco_codes = data.check_int_matrix(qinco_codes, "qinco_codes")
  extra = data.check_int_matrix(extra, "extra")
  ivf_ids = np.asarray(ivf_ids)
  if ivf_ids.ndim != 1 or ivf_ids.dtype.kind not in "iu":
    raise ValueError(f"ivf_ids: expected a 1-D integer array, got shape {ivf_ids.shape} "
                     f"and dtype {ivf_ids.dtype}")
  if len(ivf_ids) != len(qinco_codes):
    raise ValueError(f"qinco_codes has {len(qinco_codes)} rows but ivf_ids has "
                     f"{len(ivf_ids)}")
  if ivf_ids.size and (int(ivf_ids.min()) < 0 or int(ivf_ids.max()) >= len(extra)):
    raise ValueError(f"ivf_ids: list ids must lie in 0..{len(extra) - 1}, got range "
                     f"{int(ivf_ids.min())}..{int(ivf_ids.max())}")
  return np.concatenate([qinco_codes.astype(np.int32), extra[ivf_ids].astype(np.int32)],
                        axis=1)


# --------------------------------------------------------------------------------------
# The decoder


@dataclasses.dataclass
class PairwiseDecoder:
  """Sum of look-ups in tables indexed by the combined codes of pairs of positions.

  Attributes:
    K: codewords per position; combined codes are codes[:, a] * K + codes[:, b].
    pairs: T pairs (a, b) of code positions, one per table (a pair may repeat).
    tables: (T, K * K, D) float32.
    base_tables: optional (M, K, D) float32 AQ tables read from positions 0..M-1 and
      added to the pairwise sum (the decoder then refines the AQ decoder).
  """
  K: int
  pairs: list[tuple[int, int]]
  tables: np.ndarray
  base_tables: np.ndarray | None = None

  def __post_init__(self):
    self.K = int(self.K)
    if self.K < 1:
      raise ValueError(f"K must be >= 1, got {self.K}")
    self.pairs = [(int(a), int(b)) for a, b in self.pairs]
    self.tables = np.asarray(self.tables, dtype=np.float32)
    if self.tables.ndim != 3 or self.tables.shape[1] != self.K * self.K:
      raise ValueError(f"tables: expected shape (T, K*K={self.K * self.K}, D), "
                       f"got {self.tables.shape}")
    if len(self.pairs) != len(self.tables):
      raise ValueError(f"{len(self.pairs)} pairs but {len(self.tables)} tables")
    for a, b in self.pairs:
      if a < 0 or b < 0 or a == b:
        raise ValueError(f"pairs: positions must be distinct and non-negative, got "
                         f"({a}, {b})")

  @property
  def n_positions(self) -> int:
    """Minimum number of code positions the decoder reads (max position + 1)."""
    return 1 + max((max(p) for p in self.pairs), default=-1)

  @property
  def d(self) -> int:
    """Output dimension D."""
    return self.tables.shape[2]

  def decode(self, codes_ext: np.ndarray) -> np.ndarray:
    """Decodes extended codes: sum_t tables[t][codes_ext[:, a_t] * K + codes_ext[:, b_t]].

    Args:
      codes_ext: (n, P) integer codes in 0..K-1, P >= `n_positions` (see
        `extended_codes`).

    Returns:
      (n, D) float32 approximate residuals r_hat (add c_IVF[i_0] for vectors).

    Raises:
      ValueError: not a 2-D integer array, too few columns, codes out of range.
    """
    codes_ext = data.check_int_matrix(codes_ext, "codes_ext", upper=self.K)
    if codes_ext.shape[1] < self.n_positions:
      raise ValueError(f"codes_ext: the decoder reads positions up to "
                       f"{self.n_positions - 1}, got only {codes_ext.shape[1]} columns")
    out = np.zeros((len(codes_ext), self.d), np.float32)
    c = codes_ext.astype(np.int64)
    if self.base_tables is not None:
      for m, table in enumerate(self.base_tables):
        out += table[c[:, m]]
    for (a, b), table in zip(self.pairs, self.tables):
      out += table[c[:, a] * self.K + c[:, b]]
    return out

  def save(self, path: str | os.PathLike) -> None:
    """Saves the decoder as an .npz archive at exactly `path`, atomically."""
    _atomic_save_npz(os.fspath(path), {
        "format_version": np.int64(_FORMAT_VERSION),
        "K": np.int64(self.K),
        "pairs": np.asarray(self.pairs, np.int64).reshape(-1, 2),
        "tables": self.tables,
        **({} if self.base_tables is None else {"base_tables": self.base_tables}),
    })

  @classmethod
  def load(cls, path: str | os.PathLike) -> PairwiseDecoder:
    """Loads a decoder written by `save`.

    Raises:
      FileNotFoundError: missing file. ValueError: not a pairwise-decoder archive or an
      unsupported format version.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"pairwise decoder file not found: '{path}'")
    with np.load(path, allow_pickle=False) as z:
      missing = {"format_version", "K", "pairs", "tables"} - set(z.files)
      if missing:
        raise ValueError(f"'{path}' is not a pairwise decoder archive "
                         f"(missing {sorted(missing)})")
      version = int(z["format_version"])
      if version != _FORMAT_VERSION:
        raise ValueError(f"'{path}': unsupported pairwise decoder format {version}")
      pairs = [tuple(p) for p in z["pairs"].tolist()]
      base = z["base_tables"] if "base_tables" in z.files else None
      return cls(K=int(z["K"]), pairs=pairs, tables=z["tables"], base_tables=base)


# --------------------------------------------------------------------------------------
# Greedy fitting (spec 12.2, step 3)


def _in_sample_score(idx: np.ndarray, R: np.ndarray, n_eval: int, KK: int, base: float,
                     shrink: float) -> tuple[float, Callable[[], np.ndarray]]:
  """The table of one pair fitted on all rows and the SSE it leaves on rows [:n_eval].

  With T = S_all / (c_all + shrink) (0 where c_all = 0), the SSE on the eval rows is
    base - 2 sum_g S_eval[g].T[g] + sum_g c_eval[g] ||T[g]||^2.

  Args:
    idx: (n,) int64 combined codes a * K + b. R: (n, D) float32 current residual.
    n_eval: rows scored. KK: K * K groups. base: ||R[:n_eval]||^2 (float64).
    shrink: ridge penalty per entry.
  Returns:
    (sse, a function returning the (KK, D) float32 table).
  """
  n = len(idx)
  s_eval = _segment_sum(idx[:n_eval], R[:n_eval], KK)
  c_eval = np.bincount(idx[:n_eval], minlength=KK)
  if n_eval < n or shrink > 0:
    c_all = c_eval + (np.bincount(idx[n_eval:], minlength=KK) if n_eval < n else 0)
    inv = np.divide(1.0, c_all + shrink, out=np.zeros(KK),
                    where=c_all > 0).astype(np.float32)
    table = s_eval + (_segment_sum(idx[n_eval:], R[n_eval:], KK) if n_eval < n else 0.0)
    table = table * inv[:, None]
    per_group = c_eval * np.einsum("gd,gd->g", table, table) - 2.0 * np.einsum(
        "gd,gd->g", s_eval, table)
  else:  # S_eval = S_all: the SSE drops by sum_g ||S[g]||^2 / c[g]
    inv = (1.0 / np.maximum(c_eval, 1)).astype(np.float32)
    per_group = -np.einsum("gd,gd->g", s_eval, s_eval) * inv
    table = s_eval
    table *= inv[:, None]
  return base + float(per_group.sum(dtype=np.float64)), lambda: table


def _held_out_score(idx: np.ndarray, R: np.ndarray, n_eval: int, KK: int, base: float,
                    shrinks: list[float]) -> tuple[float, Callable[[], np.ndarray]]:
  """The table of one pair fitted on rows [n_eval:] and the SSE it leaves on the
  held-out rows [:n_eval], for the best of the `shrinks` values (the group sums are
  shared). With T = S_fit * w (w = 1 / (c_fit + shrink) per group), the held-out SSE is
    base + sum_g w^2 c_eval ||S_fit||^2 - 2 w S_eval.S_fit.

  Returns:
    (sse, a function returning the (KK, D) float32 table) for the best shrink (the
    first on ties); the table is only computed for the pair finally chosen.
  """
  s_eval = _segment_sum(idx[:n_eval], R[:n_eval], KK)
  c_eval = np.bincount(idx[:n_eval], minlength=KK)
  c_fit = np.bincount(idx[n_eval:], minlength=KK).astype(np.float64)
  s_fit = _segment_sum(idx[n_eval:], R[n_eval:], KK)
  ff = np.einsum("gd,gd->g", s_fit, s_fit, dtype=np.float64)
  ef = np.einsum("gd,gd->g", s_eval, s_fit, dtype=np.float64)
  best: tuple[float, np.ndarray] | None = None
  for lam in shrinks:
    w = np.divide(1.0, c_fit + lam, out=np.zeros(KK), where=c_fit > 0)
    sse = base + float((w * w * c_eval * ff - 2.0 * w * ef).sum())
    if best is None or sse < best[0]:
      best = (sse, w)
  assert best is not None  # shrinks is not empty
  w = best[1]
  return best[0], lambda: s_fit * w.astype(np.float32)[:, None]


def fit_pairwise(codes_ext: np.ndarray, residuals: np.ndarray, K: int, n_tables: int,
                 n_eval: int = 100_000, verbose: bool = False,
                 shrink: float | Sequence[float] = 0.0,
                 holdout: int = 0) -> PairwiseDecoder:
  """Greedy fit of `n_tables` pairwise tables (2M in the paper).

  With R the current residual (float32 copy of `residuals`), each iteration, for every
  pair a < b of the P positions: fit the table as the mean of R per combined code
  I = codes[:, a] * K + codes[:, b] over all rows (empty entries 0), and compute the
  MSE it leaves on the first `n_eval` rows (in closed form from group sums, float64
  totals). The best pair (first in (a, b) order on ties) is recorded and its look-up
  subtracted from R on all rows. A pair may be chosen again later.

  Cost per iteration: P (P - 1) / 2 group-by passes over the n x D residual, each
  also touching a (K*K, D) table.

  Args:
    codes_ext: (n, P) integer extended codes in 0..K-1 (`extended_codes`), P >= 2.
    residuals: (n, D) real targets in raw units, r = x - c_IVF[i_0].
    K: codewords per position (K * K rows per table).
    n_tables: number of tables to select (>= 0).
    n_eval: the selection MSE is measured on the first min(n_eval, n) rows.
    verbose: show a progress bar with the current MSE.
    shrink: ridge penalty lambda per table entry: T[g] = S[g] / (c[g] + lambda)
      (0 = the plain group mean of the spec). With few training vectors per
      combined code (K^2 = 65,536 entries per table), the plain means over-fit and
      shrinking them toward 0 helps; see docs/design.md. With `holdout`, a sequence
      of values may be given: each table then uses the one that scores best on the
      held-out rows (nearly free: the group sums are shared).
    holdout: if > 0, tables are fitted on rows [holdout:] only, the selection MSE is
      measured on the held-out rows [:holdout] (n_eval is then ignored), and the
      greedy loop stops early when no pair lowers the held-out MSE.

  Returns:
    the fitted `PairwiseDecoder`.

  Raises:
    ValueError: wrong shapes or dtypes, codes out of range, NaN/inf residuals,
      mismatched or zero row counts, P < 2, n_tables < 0, n_eval < 1.
  """
  if K < 1:
    raise ValueError(f"K must be >= 1, got {K}")
  codes_ext = data.check_int_matrix(codes_ext, "codes_ext", upper=K)
  R = data.as_float32(residuals, name="residuals", allow_empty=False).copy()
  n, P = codes_ext.shape
  D = R.shape[1]
  if len(R) != n:
    raise ValueError(f"codes_ext has {n} rows but residuals has {len(R)}")
  if P < 2:
    raise ValueError(f"codes_ext: need at least 2 code positions, got {P}")
  if n_tables < 0:
    raise ValueError(f"n_tables must be >= 0, got {n_tables}")
  if n_eval < 1:
    raise ValueError(f"n_eval must be >= 1, got {n_eval}")
  n_eval = min(n_eval, n)
  shrinks = [float(v) for v in np.atleast_1d(np.asarray(shrink, np.float64))]
  if not shrinks or min(shrinks) < 0 or not np.all(np.isfinite(shrinks)):
    raise ValueError(f"shrink must be one or more finite values >= 0, got {shrink!r}")
  if len(shrinks) > 1 and not holdout:
    raise ValueError("several shrink values need holdout > 0 to choose between them")
  shrink = shrinks[0]
  KK = K * K
  codes = codes_ext.astype(np.int64)
  all_pairs = [(a, b) for a in range(P) for b in range(a + 1, P)]
  pairs: list[tuple[int, int]] = []
  tables = np.zeros((n_tables, KK, D), np.float32)
  bar = tqdm(range(n_tables), desc="pairwise tables", disable=not verbose, leave=False)
  if holdout:
    if not 0 < holdout < n:
      raise ValueError(f"holdout must be in [1, n={n}), got {holdout}")
    n_eval = holdout
  score = (functools.partial(_held_out_score, shrinks=shrinks) if holdout else
           functools.partial(_in_sample_score, shrink=shrink))
  for t in bar:
    base = float(np.einsum("nd,nd->", R[:n_eval], R[:n_eval], dtype=np.float64))
    # (sse, pair, the function that returns its table)
    best: tuple[float, tuple[int, int], Callable[[], np.ndarray]] | None = None
    for a, b in all_pairs:
      sse, make = score(codes[:, a] * K + codes[:, b], R, n_eval, KK, base)
      if best is None or sse < best[0]:
        best = (sse, (a, b), make)
    assert best is not None  # P >= 2: all_pairs is not empty
    sse, (a, b), make_table = best
    if holdout and sse >= base:  # no pair helps on held-out rows any more
      tables = tables[:t]
      break
    chosen = make_table()
    pairs.append((a, b))
    tables[t] = chosen
    R -= chosen[codes[:, a] * K + codes[:, b]]
    bar.set_postfix(mse=f"{max(sse, 0.0) / n_eval:.4g}", pair=f"{a},{b}")
  return PairwiseDecoder(K=K, pairs=pairs, tables=tables)


__all__ = ["PairwiseDecoder", "fit_pairwise", "ivf_extra_codes", "extended_codes"]
