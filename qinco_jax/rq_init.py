"""Residual-quantiser initialisation of the codebooks (spec section 8.1), and the
package's one residual K-means, optionally weighted.

A greedy RQ with M stages, each a K-means on the current residuals, in raw units
(`residual_kmeans`; `train_rq` adds the optional joint refit; `pairwise.ivf_extra_codes`
runs it on the IVF centroids weighted by their list sizes). Our K-means (JAX, chunked,
float32, optional per-row weights) grows its seeds through progressive principal
dimensions (as faiss's RQ training does), ending with 10 Lloyd iterations in the full
space; in the first iterations of each stage it splits large clusters to replace
nearly empty ones (a hub seed otherwise draws in most residuals of the later RQ
steps), afterwards only empty ones: the spec allows any reasonable K-means here
since it only initialises training. Options measured in docs/benchmarks.md
("RQ initialisation"): k-means++ seeding, more iterations, and a joint least-squares
refit of all tables after a beam encoding (`refine`, as faiss's codebook refinement).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qinco_jax import aq, data
from qinco_jax.encode import sq_dists

_CHUNK = 16384
# K-means re-seeding: during the first SPLIT_ITERS Lloyd iterations, every cluster
# holding at most SPLIT_BELOW of the mean cluster size is moved next to a large one
# (see _split_empty); afterwards only empty clusters are. Seeding: progressive
# dimensions (PROGRESSIVE_STEPS subspaces, PROGRESSIVE_ITERS iterations in each but the
# last). Chosen from the measurements in docs/benchmarks.md ("RQ initialisation").
SPLIT_BELOW = 0.25
SPLIT_ITERS = 3
PROGRESSIVE_STEPS = 10
PROGRESSIVE_ITERS = 3
PROGRESSIVE_POINTS = 256
# Below this many rows per centroid the seeds are K random rows instead: with about one
# row per centroid (K=65536 on 66,536 rows) the 27 seeding iterations would cost almost
# three times the 10 that follow and place nothing better than the rows themselves.
PROGRESSIVE_MIN_POINTS = 2
KMEANS_INIT = "progressive"  # train_rq's default seeding (docs/benchmarks.md)
# Large K (above LARGE_K): the device chunks hold at most MAX_ENTRIES distances (rows x
# K; 64 MB), and the nearest centroid is found in two levels (_argmin), 3x faster on
# a CPU at K=16384 with the same result. K <= LARGE_K keeps the one-level path.
LARGE_K = 1024
MAX_ENTRIES = 1 << 24
_BLOCK = 128


def _argmin(D: jax.Array) -> jax.Array:
  """argmin over the last axis of D (rows, K): jnp.argmin, or for K > LARGE_K the
  minimum of each block of _BLOCK columns, then the first block holding the least,
  then the first index in it: the same index (the first of the smallest values) with a
  vectorised reduction over most of the K columns."""
  rows, K = D.shape
  if K <= LARGE_K:
    return jnp.argmin(D, axis=1)
  nb = -(-K // _BLOCK)
  Db = jnp.pad(D, ((0, 0), (0, nb * _BLOCK - K)), constant_values=jnp.inf
               ).reshape(rows, nb, _BLOCK)
  block = jnp.argmin(Db.min(-1), axis=1)  # (rows,)
  inner = jnp.take_along_axis(Db, block[:, None, None], axis=1)[:, 0]  # (rows, _BLOCK)
  return block * _BLOCK + jnp.argmin(inner, axis=1)


@functools.partial(jax.jit, static_argnames=("K",))
def _assign_accumulate(x: jax.Array, w: jax.Array, C: jax.Array, K: int):
  """Nearest centroid of each row, plus per-centroid sums and counts (weights w)."""
  idx = _argmin(sq_dists(x, C))
  sums = jax.ops.segment_sum(x * w[:, None], idx, num_segments=K)
  counts = jax.ops.segment_sum(w, idx, num_segments=K)
  err = jnp.sum(w * jnp.sum((x - C[idx]) ** 2, -1))
  return idx, sums, counts, err


def _rows_for(K: int) -> int:
  """Rows of a distance chunk against K centroids: _CHUNK, fewer for K > LARGE_K (at
  most MAX_ENTRIES distances, at least 64 rows)."""
  return _CHUNK if K <= LARGE_K else max(64, min(_CHUNK, MAX_ENTRIES // K))


def _chunks(n: int, rows: int = _CHUNK):
  for s in range(0, n, rows):
    yield s, min(s + rows, n)


def _chunk_rows(n: int, K: int = 0) -> int:
  """Rows of the device chunks for n rows: _CHUNK (`_rows_for(K)`), or for fewer rows
  the next power of two (at least 64), so that small inputs (IVF centroids) are not
  padded 16-fold. (The padding rows weigh 0: the Lloyd sums are the same. `assign`
  keeps _CHUNK rows for K <= LARGE_K, so its float32 error totals, train_rq's
  reported MSEs, do not change either.)"""
  rows = _rows_for(K)
  return rows if n >= rows else max(64, 1 << (n - 1).bit_length())


def _padded(x: np.ndarray, s: int, e: int, weights: np.ndarray | None = None,
            rows: int = _CHUNK):
  """Rows s:e of x padded to `rows` rows (fixed shape: one compilation), with weights
  (those of `weights`, 1 when None; 0 on the padding)."""
  xc = np.zeros((rows, x.shape[1]), np.float32)
  xc[: e - s] = x[s:e]
  w = np.zeros((rows,), np.float32)
  w[: e - s] = 1.0 if weights is None else weights[s:e]
  return xc, w


def _device_chunks(x: np.ndarray, weights: np.ndarray | None = None, K: int = 0
                   ) -> tuple[jax.Array, jax.Array]:
  """x as (n_chunks, rows, D) zero-padded chunks on the device (rows: `_chunk_rows`,
  for distances to K centroids), with row weights (those of `weights`, 1 when None;
  0 on the padding)."""
  n, d = x.shape
  rows = _chunk_rows(n, K)
  nc = max(-(-n // rows), 1)
  xs = np.zeros((nc * rows, d), np.float32)
  xs[:n] = x
  ws = np.zeros((nc * rows,), np.float32)
  ws[:n] = 1.0 if weights is None else weights
  return jnp.asarray(xs.reshape(nc, rows, d)), jnp.asarray(ws.reshape(nc, rows))


def _check_weights(weights, n: int) -> np.ndarray:
  """Validated per-row weights as float32: shape (n,), real, finite, >= 0, not all 0."""
  w = np.asarray(weights)
  if w.shape != (n,):
    raise ValueError(f"weights: expected shape ({n},) (one per row), got {w.shape}")
  if w.dtype.kind not in "iuf":
    raise ValueError(f"weights: expected a real numeric array, got dtype {w.dtype}")
  if not np.isfinite(w).all():
    raise ValueError("weights: expected finite values, got NaN or inf")
  if (w < 0).any():
    raise ValueError(f"weights: expected non-negative values, got minimum {w.min()}")
  if not (w > 0).any():
    raise ValueError("weights: expected at least one positive weight, got all zeros")
  return w.astype(np.float32)


def _weighted_sample(rng: np.random.Generator, weights: np.ndarray, K: int,
                     proportional: bool = True) -> np.ndarray:
  """K distinct row indices (sorted), drawn without replacement among the rows of
  positive weight, with probability proportional to the weight (else uniformly);
  when fewer than K weights are positive, all of those plus distinct rows drawn
  uniformly among the zero-weight ones. Needs K <= len(weights)."""
  positive = np.flatnonzero(weights > 0)
  if positive.size >= K:
    p = weights[positive].astype(np.float64) if proportional else None
    return np.sort(rng.choice(positive, size=K, replace=False,
                              p=None if p is None else p / p.sum()))
  zero = np.flatnonzero(weights <= 0)
  return np.sort(np.concatenate([positive,
                                 rng.choice(zero, size=K - positive.size, replace=False)]))


def _subset(rng: np.random.Generator, weights: np.ndarray | None, n: int,
            m: int) -> np.ndarray:
  """m of the n rows (sorted indices) for a subsampled fit, drawn uniformly; with
  weights (which the rows keep), among the rows of positive weight first."""
  if weights is None:
    return np.sort(rng.choice(n, m, replace=False))
  return _weighted_sample(rng, weights, m, proportional=False)


@functools.partial(jax.jit, static_argnames=("K", "with_points"))
def _lloyd_sums(xs: jax.Array, ws: jax.Array, C: jax.Array, K: int,
                with_points: bool = False):
  """Per-centroid weighted sums (K, D), weights (K,) and numbers of rows of positive
  weight (K,; zeros unless with_points) of the nearest-centroid assignment of every
  chunk: one Lloyd iteration's statistics in one call."""
  def body(carry, chunk):
    x, w = chunk
    idx, s, c, _ = _assign_accumulate(x, w, C, K)
    p = (jax.ops.segment_sum((w > 0).astype(jnp.float32), idx, num_segments=K)
         if with_points else 0.0)
    return (carry[0] + s, carry[1] + c, carry[2] + p), None

  zeros = jnp.zeros((K,), jnp.float32)
  init = (jnp.zeros((K, xs.shape[-1]), jnp.float32), zeros, zeros)
  (sums, counts, points), _ = jax.lax.scan(body, init, (xs, ws))
  return sums, counts, points


def assign(x: np.ndarray, C: np.ndarray,
           weights: np.ndarray | None = None) -> tuple[np.ndarray, float]:
  """Nearest-centroid ids (n,) int32 and the total squared error (weighted by the
  per-row `weights` when given)."""
  ids, total = np.empty(len(x), np.int32), 0.0
  Cj = jnp.asarray(C)
  rows = _rows_for(len(C))
  for s, e in _chunks(len(x), rows):
    xc, w = _padded(x, s, e, weights, rows)
    idx, _, _, err = _assign_accumulate(jnp.asarray(xc), jnp.asarray(w), Cj, K=len(C))
    ids[s:e] = np.asarray(idx)[: e - s]
    total += float(err)
  return ids, total


@functools.partial(jax.jit, static_argnames=("K",))
def _kmeanspp(x: jax.Array, key: jax.Array, K: int, w: jax.Array | None = None
              ) -> jax.Array:
  """k-means++ seeding (Arthur & Vassilvitskii): each next seed is a data point drawn
  with probability proportional to its squared distance to the seeds so far (times
  its weight w, when given; the first seed: proportional to w, else uniform)."""
  n = x.shape[0]
  k0, key = jax.random.split(key)
  if w is None:
    first = x[jax.random.randint(k0, (), 0, n)]
  else:
    first = x[jax.random.categorical(k0, jnp.log(jnp.maximum(w, 1e-30)))]
  C = jnp.zeros((K, x.shape[1]), x.dtype).at[0].set(first)
  d2 = jnp.sum((x - first[None, :]) ** 2, -1)

  def body(i, carry):
    C, d2, key = carry
    key, sub = jax.random.split(key)
    j = jax.random.categorical(sub, jnp.log(jnp.maximum(d2 if w is None else w * d2, 1e-30)))
    C = C.at[i].set(x[j])
    d2 = jnp.minimum(d2, jnp.sum((x - x[j][None, :]) ** 2, -1))
    return C, d2, key

  C, _, _ = jax.lax.fori_loop(1, K, body, (C, d2, key))
  return C


def _split_empty(C: np.ndarray, counts: np.ndarray, rng: np.random.Generator,
                 below: float = 0, points: np.ndarray | None = None) -> None:
  """Moves every cluster holding at most `below` points (0: the empty ones) next to a
  populated one, in place: the centroid of a cluster drawn with probability
  proportional to its size beyond one point is copied and both copies are pushed
  apart by a relative 1/1024 per coordinate (faiss's K-means does this for empty
  clusters), so the next assignment splits that cluster in two.

  Weighted K-means passes the clusters' weights as `counts` and their numbers of rows
  of positive weight as `points`: the size beyond one point is then
  weight * (points - 1) / points (a cluster of one heavy row cannot be split).

  Each draw is `rng.choice(K, p=sizes / sizes.sum())`'s (one `rng.random()` against
  the cumulative sizes), found in a sum tree that each split updates in O(log K): a
  large K with many small clusters (K=65536 on as many rows) costs milliseconds per
  iteration instead of seconds."""
  counts = counts.astype(np.float64).copy()
  if points is not None:
    points = points.astype(np.float64).copy()
  eps = np.where(np.arange(C.shape[1]) % 2 == 0, 1.0, -1.0) / 1024

  def size(k: int) -> float:  # the draw weight of cluster k (as sizes below)
    if points is None:
      return max(counts[k] - 1, 0.0)
    return counts[k] * max(points[k] - 1, 0.0) / max(points[k], 1.0)

  small = np.flatnonzero(counts <= below)
  if small.size == 0:
    return
  sizes = (np.maximum(counts - 1, 0) if points is None else
           counts * np.maximum(points - 1, 0) / np.maximum(points, 1))
  tree = _SumTree(sizes)
  for i in small.tolist():
    if tree.total == 0:
      return  # every cluster holds at most one point: nothing to split
    j = tree.find(rng.random() * tree.total)
    C[i] = C[j] * (1 + eps)
    C[j] = C[j] * (1 - eps)
    counts[i] = counts[j] = counts[j] / 2
    if points is not None:
      points[i] = points[j] = points[j] / 2
    tree.set(i, size(i))
    tree.set(j, size(j))


class _SumTree:
  """Non-negative weights w (K,) in a binary tree of partial sums: set one weight and
  find the first index whose cumulative weight exceeds a value, in O(log K). Every
  node is the sum of its children (recomputed, not adjusted), so all-zero weights
  total exactly 0."""

  def __init__(self, w: np.ndarray):
    self.size = 1 << max(len(w) - 1, 0).bit_length()
    self.t = np.zeros(2 * self.size, np.float64)
    self.t[self.size:self.size + len(w)] = w
    level = self.size
    while level > 1:
      self.t[level // 2:level] = self.t[level:2 * level:2] + self.t[level + 1:2 * level:2]
      level //= 2

  @property
  def total(self) -> float:
    return float(self.t[1])

  def set(self, k: int, w: float):
    node = self.size + int(k)
    self.t[node] = w
    node //= 2
    while node >= 1:
      self.t[node] = self.t[2 * node] + self.t[2 * node + 1]
      node //= 2

  def find(self, target: float) -> int:
    """The first index whose cumulative weight exceeds `target` (in [0, total)), never
    one of weight 0."""
    node = 1
    while node < self.size:
      left, right = self.t[2 * node], self.t[2 * node + 1]
      if target < left or right == 0:
        node = 2 * node
      else:
        target -= left
        node = 2 * node + 1
    return node - self.size


def kmeans(x: np.ndarray, K: int, n_iter: int = 10, seed: int = 0,
           on_iteration=None, init: str | np.ndarray = "random",
           split_iters: int | None = None, max_points: int | None = None,
           weights: np.ndarray | None = None) -> np.ndarray:
  """Lloyd K-means. x: (n, D) float32 with n >= K. Returns (K, D) float32 centroids.

  init: "random" (K distinct data points), "kmeans++" (seeded from at most 65,536
    of the points: the same cost as one Lloyd iteration over them), "progressive"
    (`_progressive_kmeans`: PROGRESSIVE_ITERS iterations in each of the growing
    principal subspaces, n_iter in the last, the full space; "random" when there are
    fewer than PROGRESSIVE_MIN_POINTS rows per centroid), or a (K, D) array of
    starting centroids.
  split_iters: Lloyd iterations (from the first) after which clusters holding at
    most a quarter of the mean cluster size are re-seeded next to large ones (None:
    SPLIT_ITERS); later iterations re-seed only empty clusters. Without it, a
    random seed of small norm becomes a hub that draws in most residuals of the
    later RQ stages and Lloyd's iterations do not undo it in time.
  max_points: fit on a random subset of at most max_points * K rows (None: all).
  on_iteration: called after each Lloyd iteration (progress reporting; also once for
    each iteration skipped after convergence), the seeding stages' included:
    `iterations(n_iter, init, n, K, max_points)` calls in all.
  weights: optional (n,) non-negative per-row weights, not all zero: the centroids
    are weighted means, "random" draws its K distinct seeds with probability
    proportional to the weight (all rows of positive weight, then uniformly among
    the others, when fewer than K are positive), "kmeans++" weights its draws,
    "progressive" uses the weighted mean and covariance, and the split sizes are
    weights. (None: every row weighs 1, as before weights existed; equal weights
    give a different random draw.) A centroid whose cluster has no weight keeps its
    place until it is re-seeded.

  Lloyd stops early, with the very centroids the remaining iterations would return,
  once an iteration after the splitting ones leaves them unchanged and no cluster is
  empty.
  """
  split_iters = SPLIT_ITERS if split_iters is None else split_iters
  n = len(x)
  if n < K:
    raise ValueError(f"K-means needs at least K={K} training vectors, got {n}")
  w = None if weights is None else _check_weights(weights, n)
  rng = np.random.default_rng(seed)
  if max_points is not None and n > max_points * K:
    keep = _subset(rng, w, n, max_points * K)
    x, w = x[keep], None if w is None else w[keep]
    n = len(x)
  if isinstance(init, np.ndarray):
    if init.shape != (K, x.shape[1]):
      raise ValueError(f"init centroids: expected shape ({K}, {x.shape[1]}), got {init.shape}")
    C = np.array(init, np.float32, copy=True)
  elif init == "progressive" and n >= PROGRESSIVE_MIN_POINTS * K:
    return _progressive_kmeans(x, K, n_iter, seed, on_iteration, split_iters, weights=w)
  elif init == "kmeans++":
    sub, wsub = x, w
    if n > 65536:
      keep = _subset(rng, w, n, 65536)
      sub, wsub = x[keep], None if w is None else w[keep]
    C = np.asarray(_kmeanspp(jnp.asarray(sub), jax.random.key(seed), K,
                             None if wsub is None else jnp.asarray(wsub)), np.float32)
  elif init in ("random", "progressive"):  # progressive: fewer than 2 rows per centroid
    rows = (np.sort(rng.choice(n, K, replace=False)) if w is None
            else _weighted_sample(rng, w, K))
    C = x[rows].astype(np.float32)
  else:
    raise ValueError(f"init must be 'random', 'kmeans++', 'progressive' or a (K, D) array, "
                     f"got {init!r}")
  xs, ws = _device_chunks(x, w, K)
  mean_size = (n if w is None else float(w.sum(dtype=np.float64))) / K
  for it in range(n_iter):
    sums, counts, points = _lloyd_sums(xs, ws, jnp.asarray(C), K=K,
                                       with_points=w is not None)
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1e-30)[:, None],
                   C).astype(np.float32)
    if it >= split_iters and (counts > 0).all() and np.array_equal(new, C):
      # Converged: every later iteration would compute these same centroids again.
      if on_iteration is not None:
        for _ in range(n_iter - it):
          on_iteration()
      return new
    C = new
    _split_empty(C, counts, rng, below=SPLIT_BELOW * mean_size if it < split_iters else 0,
                 points=None if w is None else np.asarray(points))
    if on_iteration is not None:
      on_iteration()
  return C


def iterations(n_iter: int, init: str | np.ndarray, n: int | None = None,
               K: int | None = None, max_points: int | None = None) -> int:
  """Lloyd iterations (`on_iteration` calls) of one `kmeans` of n rows into K
  clusters: n_iter, plus those of the seeding stages with init="progressive" (when it
  applies: at least PROGRESSIVE_MIN_POINTS rows per centroid; n, K None: it does)."""
  if not (isinstance(init, str) and init == "progressive"):
    return n_iter
  if n is not None and K is not None:
    n = n if max_points is None else min(n, max_points * K)
    if n < PROGRESSIVE_MIN_POINTS * K:
      return n_iter
  return n_iter + (PROGRESSIVE_STEPS - 1) * PROGRESSIVE_ITERS


def _progressive_kmeans(x, K, n_iter, seed, on_iteration, split_iters, steps=None,
                        weights=None):
  """K-means in the principal axes of x, first in 1 dimension, then in d^(i/steps)
  dimensions for i = 2..steps, each stage started from the previous centroids padded
  with zeros (faiss's progressive-dimension clustering, its RQ training default).
  The stages before the last see at most PROGRESSIVE_POINTS * K rows (faiss's
  K-means cap, applied by faiss to every stage); the last, in the full space, all.
  With per-row weights: the weighted mean and covariance, and weighted stages."""
  steps = PROGRESSIVE_STEPS if steps is None else steps
  n, d = x.shape
  if weights is None:
    mean = x.mean(0, dtype=np.float64)
    xc = x - mean.astype(np.float32)
    cov = (xc.T.astype(np.float64) @ xc) / n
  else:
    p = weights.astype(np.float64) / weights.sum(dtype=np.float64)
    mean = p @ x
    xc = x - mean.astype(np.float32)
    cov = (xc.T * p) @ xc
  _, V = np.linalg.eigh(cov)
  V = V[:, ::-1].astype(np.float32)  # principal axes, largest variance first
  y = xc @ V
  # The low-dimensional stages only place the seeds: at most PROGRESSIVE_POINTS per
  # centroid take part in them; the last stage (the full space) uses every row.
  rng = np.random.default_rng(seed)
  sub, wsub = y, weights
  if n > PROGRESSIVE_POINTS * K:
    keep = _subset(rng, weights, n, PROGRESSIVE_POINTS * K)
    sub, wsub = y[keep], None if weights is None else weights[keep]
  C = None
  for i in range(steps):
    di = max(int(d ** ((1 + i) / steps)), 1)
    init = "random" if C is None else np.pad(C, ((0, 0), (0, di - C.shape[1])))
    last = i == steps - 1
    C = kmeans(np.ascontiguousarray((y if last else sub)[:, :di]), K,
               n_iter if last else PROGRESSIVE_ITERS, seed, on_iteration, init,
               split_iters, weights=weights if last else wsub)
  return (C @ V.T + mean).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("B",))
def _rq_encode_chunk(x: jax.Array, tables: jax.Array, B: int):
  """Beam search over plain residual-quantiser tables (M, K, D): codes (n, M) int32."""
  M, K, _ = tables.shape
  F = min(B, K)
  _, idx = jax.lax.top_k(-sq_dists(x, tables[0]), F)  # (n, F)
  x_hat = tables[0][idx]  # (n, F, D)
  codes = idx[:, :, None]
  for m in range(1, M):
    r = x[:, None, :] - x_hat  # (n, F, D)
    T = tables[m]
    dist = (jnp.sum(r * r, -1, keepdims=True) - 2.0 * r @ T.T
            + jnp.sum(T * T, -1)[None, None, :])  # (n, F, K)
    n = x.shape[0]
    _, sel = jax.lax.top_k(-dist.reshape(n, -1), F)  # (n, F)
    parent, code = sel // K, sel % K
    x_hat = jnp.take_along_axis(x_hat, parent[:, :, None], 1) + T[code]
    codes = jnp.concatenate([jnp.take_along_axis(codes, parent[:, :, None], 1),
                             code[:, :, None]], -1)
  return codes[:, 0].astype(jnp.int32)


def rq_encode(x: np.ndarray, tables: np.ndarray, B: int = 1) -> np.ndarray:
  """Codes (n, M) int32 of a plain residual quantiser (tables (M, K, D)), beam B."""
  out = np.empty((len(x), len(tables)), np.int32)
  T = jnp.asarray(tables)
  for s, e in _chunks(len(x)):
    out[s:e] = np.asarray(_rq_encode_chunk(jnp.asarray(_padded(x, s, e)[0]), T, B=B))[:e - s]
  return out


def _residual_stages(x: np.ndarray, K: int, M: int, bar, *, n_iter: int, seed: int,
                     init: str, split_iters: int | None, max_points: int | None,
                     weights: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, list[float]]:
  """Greedy residual K-means: M `kmeans` (seed + m at stage m) on the running residual,
  which then loses each row's nearest codeword. Returns the codes (n, M) int32, the
  codebooks (M, K, D) float32 and the (weighted) squared error left after each stage;
  `bar` (tqdm) counts the Lloyd iterations, the seeding stages' included."""
  residual = np.array(x, dtype=np.float32, copy=True)
  codes = np.empty((len(x), M), np.int32)
  codebooks, errs = [], []
  for m in range(M):
    bar.set_postfix(stage=m)
    C = kmeans(residual, K, n_iter=n_iter, seed=seed + m, on_iteration=bar.update,
               init=init, split_iters=split_iters, max_points=max_points, weights=weights)
    ids, err = assign(residual, C, weights)
    residual -= C[ids]
    codes[:, m] = ids
    codebooks.append(C)
    errs.append(err)
  return codes, np.stack(codebooks), errs


def residual_kmeans(x: np.ndarray, K: int, n_stages: int, n_iter: int = 10, seed: int = 0,
                    weights: np.ndarray | None = None, init: str | None = None,
                    split_iters: int | None = None, max_points: int | None = None,
                    verbose: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Residual K-means (a greedy residual quantiser), optionally weighted.

  Stage s runs `kmeans` (seed + s) on the running residual (x at first); each row's
  stage code is its nearest codeword, which its residual then loses. With `weights`,
  every stage minimises sum_i weights[i] * ||residual_i - c||^2 (weighted Lloyd means,
  weighted seeding; see `kmeans`).

  Args:
    x: (n, D) real points, n >= 1.
    K: codewords per stage; capped at n when n < K.
    n_stages: number of stages (>= 1).
    n_iter: Lloyd iterations per stage (>= 0; fewer when Lloyd has converged).
    seed: seed of stage 0 (stage s uses seed + s).
    weights: optional (n,) finite non-negative row weights, not all zero.
    init, split_iters, max_points: see `kmeans` (init None: KMEANS_INIT).
    verbose: progress bar over all stages' iterations.

  Returns:
    codes: (n, n_stages) int32 in 0..min(K, n)-1.
    codebooks: (n_stages, min(K, n), D) float32;
      x ~= sum_s codebooks[s][codes[:, s]].

  Raises:
    ValueError: x not a non-empty 2-D real array or with NaN/inf; weights of the wrong
      shape or dtype, NaN/inf, negative or all zero; n_stages or K < 1, n_iter < 0.
  """
  x = data.as_float32(x, name="x", allow_empty=False)
  if n_stages < 1 or K < 1 or n_iter < 0:
    raise ValueError(f"expected n_stages >= 1, K >= 1 and n_iter >= 0, got n_stages="
                     f"{n_stages}, K={K}, n_iter={n_iter}")
  w = None if weights is None else _check_weights(weights, len(x))
  K = min(K, len(x))
  init = KMEANS_INIT if init is None else init
  with tqdm(total=n_stages * iterations(n_iter, init, len(x), K, max_points),
            desc=f"residual K-means (K={K}, {n_stages} stages)", unit="iter",
            disable=not verbose, leave=False) as bar:
    codes, codebooks, _ = _residual_stages(
        x, K, n_stages, bar, weights=w, n_iter=n_iter, seed=seed, init=init,
        split_iters=split_iters, max_points=max_points)
  return codes, codebooks


def train_rq(x: np.ndarray, K: int, M: int, n_iter: int = 10, seed: int = 0,
             verbose: bool = False, init: str | None = None, refine: int = 0,
             refine_beam: int = 1, split_iters: int | None = None,
             max_points: int | None = None) -> tuple[list[np.ndarray], list[float]]:
  """Greedy residual quantiser in the units of x (`residual_kmeans`), then optionally
  a joint refit.

  Cost: M stages of `n_iter` Lloyd iterations (plus 27 cheaper ones that place the
  seeds, with the default progressive seeding), each about 2 n K D flops (the
  distances), so about 2 M n_iter n K D in all: linear in K. For 1M vectors of D=128
  that is 2.6 TFLOP at K=256, M=8 (seconds on a GPU, a few minutes on a 2-core CPU)
  and about 670 TFLOP at K=65536 (hours on that CPU). `verbose` shows a progress bar
  over all M x `iterations(n_iter, init, n, K)` iterations, with the time left. With
  fewer than two vectors per codeword the seeds are random vectors (no progressive
  stages), and above K=1024 the distances are computed in chunks of at most 64 MB:
  K=65536 on 66,536 vectors of D=8 (M=2) took 354 s on a shared 2-core CPU (20
  iterations of about 21 s; docs/design.md, "RQ initialisation").

  Args:
    x: (n, D) float32 training vectors.
    K, M: codebook size and number of stages.
    n_iter: Lloyd iterations per stage.
    init: K-means seeding, "progressive", "random" or "kmeans++" (None: KMEANS_INIT,
      "progressive").
    split_iters: see `kmeans` (None: SPLIT_ITERS).
    refine: rounds of joint refinement after the greedy stages: encode with a beam of
      `refine_beam`, then refit all M tables together by least squares
      (`aq.fit_aq`, minimum-norm), as faiss's codebook refinement does.
  Returns:
    M codebooks (K, D) float32 and the training MSE (sum over dims, mean over
    vectors) after each stage (of the greedy pass).
  """
  init = KMEANS_INIT if init is None else init
  with tqdm(total=M * iterations(n_iter, init, len(x), K, max_points) + refine,
            desc=f"RQ init (K={K}, M={M})",
            unit="iter", disable=not verbose, leave=False) as bar:
    _, tables, errs = _residual_stages(x, K, M, bar, n_iter=n_iter, seed=seed, init=init,
                                       split_iters=split_iters, max_points=max_points)
    codebooks = list(tables)
    mses = [err / len(x) for err in errs]
    xf = np.asarray(x, np.float32)
    for _ in range(refine):
      bar.set_postfix(stage="refine")
      tables = aq.fit_aq(rq_encode(xf, np.stack(codebooks), refine_beam), xf, K)
      codebooks = list(tables)
      bar.update()
  return codebooks, mses
