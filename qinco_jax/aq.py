"""AQ decoder stage (spec 12.1, step 4): least-squares additive tables for QINCo2 codes.

QINCo2 codes are decoded by a neural network, which is too slow to score the tens of
thousands of candidates an IVF search visits. The search pipeline therefore ranks
them first with a plain additive decoder: M tables T_m of shape (K, D), fitted
jointly by least squares so that

    r ~= sum_m T_m[codes[:, m]],      r = x - c_IVF[i_0]  (raw units).

The design matrix is the one-hot encoding of all M codes (n x M*K); it is never
materialised. The normal equations G = A^T A (code co-occurrence counts) and A^T R are
accumulated chunk by chunk in float64 and solved with a pseudo-inverse, which gives the
minimum-norm solution: codes that never occur get all-zero rows.
"""

from __future__ import annotations

import numpy as np

from qinco_jax import data


def _one_hot_t_matmul(cols: np.ndarray, values: np.ndarray, n_cols: int) -> np.ndarray:
  """A^T @ values for the 0/1 matrix A (n, n_cols) with ones at (i, cols[i, j]).

  Args:
    cols: (n, J) int column indices (J ones per row).
    values: (n, D) float64.
    n_cols: number of columns of A.

  Returns:
    (n_cols, D) float64.
  """
  n, J = cols.shape
  try:
    import scipy.sparse as sp
  except ImportError:  # pragma: no cover - scipy ships with jax
    out = np.zeros((n_cols, values.shape[1]), np.float64)
    for j in range(J):
      np.add.at(out, cols[:, j], values)
    return out
  # A^T in CSC form: column i of A^T holds the J ones of row i of A.
  at = sp.csc_matrix((np.ones(n * J), cols.reshape(-1).astype(np.int64),
                      np.arange(0, n * J + 1, J)), shape=(n_cols, n))
  return np.asarray(at @ values)


def normal_equations(codes: np.ndarray, residuals: np.ndarray, K: int,
                     chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
  """Accumulates the normal equations of the joint one-hot least-squares problem.

  Row m*K + k of the design matrix's columns corresponds to code k at position m.

  Args:
    codes: (n, M) integer codes in 0..K-1.
    residuals: (n, D) real targets.
    K: codewords per position.
    chunk: rows processed at a time.

  Returns:
    G: (M*K, M*K) float64, A^T A (co-occurrence counts of code pairs).
    ATR: (M*K, D) float64, A^T R.

  Raises:
    ValueError: see `fit_aq`.
  """
  codes, residuals = _check_inputs(codes, residuals, K)
  n, M = codes.shape
  D = residuals.shape[1]
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}")
  MK = M * K
  G = np.zeros((MK, MK), np.float64)
  ATR = np.zeros((MK, D), np.float64)
  offsets = np.arange(M, dtype=np.int64) * K
  for s in range(0, n, chunk):
    c = codes[s:s + chunk].astype(np.int64)
    r = np.asarray(residuals[s:s + chunk], dtype=np.float64)
    for a in range(M):
      for b in range(a, M):
        counts = np.bincount(c[:, a] * K + c[:, b], minlength=K * K).reshape(K, K)
        G[a * K:(a + 1) * K, b * K:(b + 1) * K] += counts
    ATR += _one_hot_t_matmul(c + offsets, r, MK)
  # Only the upper block triangle was filled; mirror it (diagonal blocks are diagonal).
  for a in range(M):
    for b in range(a + 1, M):
      G[b * K:(b + 1) * K, a * K:(a + 1) * K] = G[a * K:(a + 1) * K, b * K:(b + 1) * K].T
  return G, ATR


def _check_inputs(codes, residuals, K: int) -> tuple[np.ndarray, np.ndarray]:
  if K < 1:
    raise ValueError(f"K must be >= 1, got {K}")
  codes = data.check_int_matrix(codes, "codes", upper=K)
  residuals = np.asarray(residuals)
  if residuals.dtype.kind not in "iuf":
    raise ValueError(f"residuals: expected a real numeric array, got dtype {residuals.dtype}")
  if residuals.ndim != 2:
    raise ValueError(
        f"residuals: expected a 2-D array of shape (n, D), got shape {residuals.shape}")
  if len(codes) != len(residuals):
    raise ValueError(f"codes has {len(codes)} rows but residuals has {len(residuals)}")
  if len(codes) == 0:
    raise ValueError("need at least one training vector, got n = 0")
  if codes.shape[1] == 0:
    raise ValueError("codes: need at least one code position, got M = 0")
  if residuals.dtype.kind == "f" and not np.isfinite(residuals).all():
    row = int(np.flatnonzero(~np.isfinite(residuals).all(axis=1))[0])
    raise ValueError(f"residuals: contains NaN or inf; first bad row is {row}")
  return codes, residuals


def solve_min_norm(G: np.ndarray, B: np.ndarray) -> np.ndarray:
  """Minimum-norm solution X = G^+ B of G X = B for a symmetric PSD G, float64.

  Rows/columns of G that are entirely zero (unused codes) are dropped and get zero
  rows in X; the rest is solved by an eigendecomposition, discarding eigenvalues
  below `max_eig * size * eps` (the same cut-off as `np.linalg.lstsq(rcond=None)`).

  Args:
    G: (N, N) symmetric positive semi-definite matrix.
    B: (N, D) right-hand sides.

  Returns:
    (N, D) float64.
  """
  G = np.asarray(G, np.float64)
  B = np.asarray(B, np.float64)
  X = np.zeros(B.shape, np.float64)
  used = np.flatnonzero(np.diag(G) > 0)
  if used.size == 0:
    return X
  w, V = np.linalg.eigh(G[np.ix_(used, used)])
  keep = w > w.max() * used.size * np.finfo(np.float64).eps
  V = V[:, keep]
  X[used] = V @ ((V.T @ B[used]) / w[keep][:, None])
  return X


def fit_aq(codes: np.ndarray, residuals: np.ndarray, K: int, chunk: int = 65536) -> np.ndarray:
  """Fits M additive tables jointly by least squares: min ||r - sum_m T_m[codes[:, m]]||^2.

  The solution is the minimum-norm one (the tables are only defined up to constant
  shifts between positions): a code that never occurs gets an all-zero row.
  Cost: O(n M^2) to count, O((M K)^3) to solve; G takes (M K)^2 float64
  (32 MB for M=8, K=256; 128 MB for M=16).

  Args:
    codes: (n, M) integer QINCo2 codes in 0..K-1 (without the IVF column).
    residuals: (n, D) real targets in raw units, r = x - c_IVF[i_0].
    K: codewords per position.
    chunk: rows processed at a time while accumulating the normal equations.

  Returns:
    (M, K, D) float32 tables.

  Raises:
    ValueError: codes not a 2-D integer array or out of 0..K-1, residuals not 2-D,
      NaN/inf residuals, mismatched or zero row counts.
  """
  G, ATR = normal_equations(codes, residuals, K, chunk=chunk)
  M = G.shape[0] // K
  T = solve_min_norm(G, ATR)
  return T.reshape(M, K, -1).astype(np.float32)


def aq_decode(tables: np.ndarray, codes: np.ndarray) -> np.ndarray:
  """Additive decoding: sum_m tables[m][codes[:, m]].

  Args:
    tables: (M, K, D) float tables, e.g. from `fit_aq`.
    codes: (n, M) integer codes in 0..K-1.

  Returns:
    (n, D) float32.

  Raises:
    ValueError: tables not 3-D, codes with the wrong number of columns or out of range.
  """
  tables = np.asarray(tables)
  if tables.ndim != 3:
    raise ValueError(f"tables: expected shape (M, K, D), got {tables.shape}")
  M, K, D = tables.shape
  codes = data.check_int_matrix(codes, "codes", upper=K)
  if codes.shape[1] != M:
    raise ValueError(f"codes: expected {M} columns (one per table), got {codes.shape[1]}")
  out = np.zeros((len(codes), D), np.float32)
  for m in range(M):
    out += tables[m][codes[:, m]]
  return out


__all__ = ["fit_aq", "aq_decode", "normal_equations", "solve_min_norm"]
