"""Evaluation stage: reconstruction MSE, exact search, recall and codebook usage.

All metrics are NumPy (faiss for exhaustive search) and take raw-unit arrays, which
may be memory-mapped; reductions are accumulated in float64 chunk by chunk.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qinco_jax.data import check_int_matrix, compute_gt, iter_chunks

_CHUNK = 1 << 16


def _check_pair(x: np.ndarray, x_hat: np.ndarray) -> None:
  if x.ndim != 2:
    raise ValueError(f"x: expected a 2-D array of shape (n, d), got shape {x.shape}")
  if x_hat.shape != x.shape:
    raise ValueError(f"x_hat: expected shape {x.shape} (same as x), got {x_hat.shape}")
  if x.shape[0] == 0:
    raise ValueError("x: expected at least one vector, got 0")


def mse(x: np.ndarray, x_hat: np.ndarray, mse_scale: float = 1.0) -> float:
  """Reconstruction MSE: sum over dimensions, mean over vectors, times `mse_scale`.

  Args:
    x: (n, d) original vectors, raw units, any real dtype.
    x_hat: (n, d) reconstructions.
    mse_scale: reporting factor (1e-4 for BigANN and FB-ssnpp, 1 otherwise).

  Returns:
    mse_scale * mean_n sum_d (x - x_hat)^2, as a Python float (float64 accumulation).
  """
  x, x_hat = np.asarray(x), np.asarray(x_hat)
  _check_pair(x, x_hat)
  total = 0.0
  for start, xc in iter_chunks(x, _CHUNK):
    diff = np.asarray(xc, np.float64) - np.asarray(x_hat[start:start + len(xc)], np.float64)
    total += float(np.square(diff).sum())
  return float(mse_scale) * total / x.shape[0]


def knn(queries: np.ndarray, db: np.ndarray, k: int = 100,
        db_chunk: int = 1 << 20) -> np.ndarray:
  """Exact L2 k-nearest neighbours (faiss flat search, merged over db chunks).

  Args:
    queries: (n_q, d) query vectors.
    db: (n_db, d) database (may be a memmap larger than memory).
    k: number of neighbours, 1..n_db.
    db_chunk: database rows searched at a time.

  Returns:
    (n_q, k) int64 ids into db, nearest first.
  """
  queries, db = np.asarray(queries), np.asarray(db)
  if queries.ndim != 2 or db.ndim != 2 or queries.shape[1] != db.shape[1]:
    raise ValueError(f"knn expects queries (n_q, d) and db (n_db, d) of the same d, "
                     f"got {queries.shape} and {db.shape}")
  return compute_gt(db, queries, k, db_chunk)


def recall_at(I: np.ndarray, gt: np.ndarray,
              ks: Sequence[int] = (1, 10, 100)) -> dict[str, float]:
  """1-recall@k: fraction of queries whose true nearest neighbour is in the top k results.

  Args:
    I: (n_q, k_max) int search results, best first.
    gt: (n_q, >=1) int ground truth (only column 0, the true nearest, is used), or (n_q,).
    ks: cut-offs, each in 1..k_max.

  Returns:
    {"R@k": fraction in [0, 1]} for each k (multiply by 100 for percent).
  """
  I, gt = np.asarray(I), np.asarray(gt)
  if gt.ndim == 1:
    gt = gt[:, None]
  if I.ndim != 2 or gt.ndim != 2 or gt.shape[1] < 1:
    raise ValueError(f"recall_at expects I (n_q, k) and gt (n_q, >=1), "
                     f"got {I.shape} and {gt.shape}")
  if I.shape[0] != gt.shape[0]:
    raise ValueError(f"gt: expected {I.shape[0]} rows (one per query in I), got {gt.shape[0]}")
  if I.shape[0] == 0:
    raise ValueError("recall_at needs at least one query, got 0")
  hit = I == gt[:, :1]
  first = np.where(hit.any(axis=1), hit.argmax(axis=1), I.shape[1])
  out = {}
  for k in ks:
    if not 1 <= k <= I.shape[1]:
      raise ValueError(f"R@{k} needs k in 1..{I.shape[1]} (result columns), got {k}")
    out[f"R@{k}"] = float(np.mean(first < k))
  return out


def codebook_usage(codes: np.ndarray, K: int) -> dict:
  """Per-step code histogram statistics.

  Args:
    codes: (n, M) integer codes, each in [0, K).
    K: codebook size.

  Returns:
    dict with "entropy" (list of M entropies in bits, -sum p log2 p, at most log2 K),
    "unused_frac" (list of M fractions of codewords never chosen), "mean_entropy",
    "min_entropy" and "mean_unused_frac" (floats).
  """
  if K < 1:
    raise ValueError(f"K must be >= 1, got {K}")
  codes = check_int_matrix(codes, "codes", K)
  if codes.shape[0] == 0:
    raise ValueError("codes: expected at least one row, got none")
  entropy, unused = [], []
  for m in range(codes.shape[1]):
    counts = np.bincount(codes[:, m].astype(np.int64), minlength=K)
    p = counts[counts > 0] / codes.shape[0]
    entropy.append(float(-(p * np.log2(p)).sum()) + 0.0)
    unused.append(float(np.mean(counts == 0)))
  return {
      "entropy": entropy,
      "unused_frac": unused,
      "mean_entropy": float(np.mean(entropy)) if entropy else 0.0,
      "min_entropy": float(np.min(entropy)) if entropy else 0.0,
      "mean_unused_frac": float(np.mean(unused)) if unused else 0.0,
  }
