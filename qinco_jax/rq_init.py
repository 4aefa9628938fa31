"""Residual-quantiser initialisation of the codebooks (spec section 8.1).

A greedy RQ with M stages, each a K-means of 10 Lloyd iterations on the current
residuals, in raw units. Our K-means (JAX, chunked, float32) starts from K distinct
random data points and re-seeds empty clusters with random data points: the spec
allows any reasonable K-means here since it only initialises training.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qinco_jax.encode import sq_dists

_CHUNK = 16384


@functools.partial(jax.jit, static_argnames=("K",))
def _assign_accumulate(x: jax.Array, w: jax.Array, C: jax.Array, K: int):
  """Nearest centroid of each row, plus per-centroid sums and counts (weights w)."""
  idx = jnp.argmin(sq_dists(x, C), axis=1)
  sums = jax.ops.segment_sum(x * w[:, None], idx, num_segments=K)
  counts = jax.ops.segment_sum(w, idx, num_segments=K)
  err = jnp.sum(w * jnp.sum((x - C[idx]) ** 2, -1))
  return idx, sums, counts, err


def _chunks(n: int):
  for s in range(0, n, _CHUNK):
    yield s, min(s + _CHUNK, n)


def _padded(x: np.ndarray, s: int, e: int):
  """Rows s:e of x padded to _CHUNK rows (fixed shape: one compilation), with weights."""
  xc = np.zeros((_CHUNK, x.shape[1]), np.float32)
  xc[: e - s] = x[s:e]
  w = np.zeros((_CHUNK,), np.float32)
  w[: e - s] = 1.0
  return xc, w


def assign(x: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, float]:
  """Nearest-centroid ids (n,) int32 and the total squared error."""
  ids, total = np.empty(len(x), np.int32), 0.0
  Cj = jnp.asarray(C)
  for s, e in _chunks(len(x)):
    idx, _, _, err = _assign_accumulate(*map(jnp.asarray, _padded(x, s, e)), Cj, K=len(C))
    ids[s:e] = np.asarray(idx)[: e - s]
    total += float(err)
  return ids, total


def kmeans(x: np.ndarray, K: int, n_iter: int = 10, seed: int = 0,
           on_iteration=None) -> np.ndarray:
  """Lloyd K-means. x: (n, D) float32 with n >= K. Returns (K, D) float32 centroids.

  on_iteration: called after each Lloyd iteration (progress reporting).
  """
  n = len(x)
  if n < K:
    raise ValueError(f"K-means needs at least K={K} training vectors, got {n}")
  rng = np.random.default_rng(seed)
  C = x[np.sort(rng.choice(n, K, replace=False))].astype(np.float32)
  for _ in range(n_iter):
    sums = np.zeros_like(C, dtype=np.float64)
    counts = np.zeros(K, np.float64)
    Cj = jnp.asarray(C)
    for s, e in _chunks(n):
      _, cs, cc, _ = _assign_accumulate(*map(jnp.asarray, _padded(x, s, e)), Cj, K=K)
      sums += np.asarray(cs)
      counts += np.asarray(cc)
    empty = counts == 0
    C = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
    if empty.any():  # re-seed empty clusters with random data points
      C[empty] = x[rng.choice(n, int(empty.sum()), replace=False)]
    if on_iteration is not None:
      on_iteration()
  return C


def train_rq(x: np.ndarray, K: int, M: int, n_iter: int = 10, seed: int = 0,
             verbose: bool = False) -> tuple[list[np.ndarray], list[float]]:
  """Greedy residual quantiser in the units of x.

  Cost: M stages of `n_iter` Lloyd iterations, each about 2 n K D flops (the
  distances), so 2 M n_iter n K D in all: linear in K. For 1M vectors of D=128 that
  is 2.6 TFLOP at K=256, M=8 (seconds on a GPU, a few minutes on a 2-core CPU) and
  about 670 TFLOP at K=65536 (hours on that CPU). `verbose` shows a progress bar
  over all M x n_iter iterations, with the time left.

  Args:
    x: (n, D) float32 training vectors.
    K, M: codebook size and number of stages.
  Returns:
    M codebooks (K, D) float32 and the training MSE (sum over dims, mean over
    vectors) after each stage.
  """
  residual = np.array(x, dtype=np.float32, copy=True)
  codebooks, mses = [], []
  with tqdm(total=M * n_iter, desc=f"RQ init (K={K}, M={M})", unit="iter",
            disable=not verbose, leave=False) as bar:
    for m in range(M):
      bar.set_postfix(stage=m)
      C = kmeans(residual, K, n_iter=n_iter, seed=seed + m, on_iteration=bar.update)
      ids, err = assign(residual, C)
      residual -= C[ids]
      codebooks.append(C)
      mses.append(err / len(x))
  return codebooks, mses
