"""Residual-quantiser initialisation of the codebooks (spec section 8.1).

A greedy RQ with M stages, each a K-means on the current residuals, in raw units.
Our K-means (JAX, chunked, float32) grows its seeds through progressive principal
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

from qinco_jax import aq
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
KMEANS_INIT = "progressive"  # train_rq's default seeding (docs/benchmarks.md)


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


def _device_chunks(x: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """x as (n_chunks, _CHUNK, D) zero-padded chunks on the device, with row weights."""
  n, d = x.shape
  nc = max(-(-n // _CHUNK), 1)
  xs = np.zeros((nc * _CHUNK, d), np.float32)
  xs[:n] = x
  ws = np.zeros((nc * _CHUNK,), np.float32)
  ws[:n] = 1.0
  return jnp.asarray(xs.reshape(nc, _CHUNK, d)), jnp.asarray(ws.reshape(nc, _CHUNK))


@functools.partial(jax.jit, static_argnames=("K",))
def _lloyd_sums(xs: jax.Array, ws: jax.Array, C: jax.Array, K: int):
  """Per-centroid sums (K, D) and counts (K,) of the nearest-centroid assignment of
  every chunk: one Lloyd iteration's statistics in one call."""
  def body(carry, chunk):
    x, w = chunk
    _, s, c, _ = _assign_accumulate(x, w, C, K)
    return (carry[0] + s, carry[1] + c), None

  init = (jnp.zeros((K, xs.shape[-1]), jnp.float32), jnp.zeros((K,), jnp.float32))
  (sums, counts), _ = jax.lax.scan(body, init, (xs, ws))
  return sums, counts


def assign(x: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, float]:
  """Nearest-centroid ids (n,) int32 and the total squared error."""
  ids, total = np.empty(len(x), np.int32), 0.0
  Cj = jnp.asarray(C)
  for s, e in _chunks(len(x)):
    idx, _, _, err = _assign_accumulate(*map(jnp.asarray, _padded(x, s, e)), Cj, K=len(C))
    ids[s:e] = np.asarray(idx)[: e - s]
    total += float(err)
  return ids, total


@functools.partial(jax.jit, static_argnames=("K",))
def _kmeanspp(x: jax.Array, key: jax.Array, K: int) -> jax.Array:
  """k-means++ seeding (Arthur & Vassilvitskii): each next seed is a data point drawn
  with probability proportional to its squared distance to the seeds so far."""
  n = x.shape[0]
  k0, key = jax.random.split(key)
  first = x[jax.random.randint(k0, (), 0, n)]
  C = jnp.zeros((K, x.shape[1]), x.dtype).at[0].set(first)
  d2 = jnp.sum((x - first[None, :]) ** 2, -1)

  def body(i, carry):
    C, d2, key = carry
    key, sub = jax.random.split(key)
    j = jax.random.categorical(sub, jnp.log(jnp.maximum(d2, 1e-30)))
    C = C.at[i].set(x[j])
    d2 = jnp.minimum(d2, jnp.sum((x - x[j][None, :]) ** 2, -1))
    return C, d2, key

  C, _, _ = jax.lax.fori_loop(1, K, body, (C, d2, key))
  return C


def _split_empty(C: np.ndarray, counts: np.ndarray, rng: np.random.Generator,
                 below: float = 0) -> None:
  """Moves every cluster holding at most `below` points (0: the empty ones) next to a
  populated one, in place: the centroid of a cluster drawn with probability
  proportional to its size beyond one point is copied and both copies are pushed
  apart by a relative 1/1024 per coordinate (faiss's K-means does this for empty
  clusters), so the next assignment splits that cluster in two."""
  counts = counts.astype(np.float64).copy()
  eps = np.where(np.arange(C.shape[1]) % 2 == 0, 1.0, -1.0) / 1024
  for i in np.flatnonzero(counts <= below):
    p = np.maximum(counts - 1, 0)
    if p.sum() == 0:
      return  # every cluster holds at most one point: nothing to split
    j = rng.choice(len(C), p=p / p.sum())
    C[i] = C[j] * (1 + eps)
    C[j] = C[j] * (1 - eps)
    counts[i] = counts[j] = counts[j] / 2


def kmeans(x: np.ndarray, K: int, n_iter: int = 10, seed: int = 0,
           on_iteration=None, init: str | np.ndarray = "random",
           split_iters: int | None = None, max_points: int | None = None) -> np.ndarray:
  """Lloyd K-means. x: (n, D) float32 with n >= K. Returns (K, D) float32 centroids.

  init: "random" (K distinct data points), "kmeans++" (seeded from at most 65,536
    of the points: the same cost as one Lloyd iteration over them), "progressive"
    (`_progressive_kmeans`: PROGRESSIVE_ITERS iterations in each of the growing
    principal subspaces, n_iter in the last, the full space), or a (K, D) array of
    starting centroids.
  split_iters: Lloyd iterations (from the first) after which clusters holding at
    most a quarter of the mean cluster size are re-seeded next to large ones (None:
    SPLIT_ITERS); later iterations re-seed only empty clusters. Without it, a
    random seed of small norm becomes a hub that draws in most residuals of the
    later RQ stages and Lloyd's iterations do not undo it in time.
  max_points: fit on a random subset of at most max_points * K rows (None: all).
  on_iteration: called after each Lloyd iteration (progress reporting).
  """
  split_iters = SPLIT_ITERS if split_iters is None else split_iters
  n = len(x)
  if n < K:
    raise ValueError(f"K-means needs at least K={K} training vectors, got {n}")
  rng = np.random.default_rng(seed)
  if max_points is not None and n > max_points * K:
    x = x[np.sort(rng.choice(n, max_points * K, replace=False))]
    n = len(x)
  if isinstance(init, np.ndarray):
    if init.shape != (K, x.shape[1]):
      raise ValueError(f"init centroids: expected shape ({K}, {x.shape[1]}), got {init.shape}")
    C = np.array(init, np.float32, copy=True)
  elif init == "progressive":
    return _progressive_kmeans(x, K, n_iter, seed, on_iteration, split_iters)
  elif init == "kmeans++":
    sub = x if n <= 65536 else x[np.sort(rng.choice(n, 65536, replace=False))]
    C = np.asarray(_kmeanspp(jnp.asarray(sub), jax.random.key(seed), K), np.float32)
  elif init == "random":
    C = x[np.sort(rng.choice(n, K, replace=False))].astype(np.float32)
  else:
    raise ValueError(f"init must be 'random', 'kmeans++', 'progressive' or a (K, D) array, "
                     f"got {init!r}")
  xs, ws = _device_chunks(x)
  for it in range(n_iter):
    sums, counts = _lloyd_sums(xs, ws, jnp.asarray(C), K=K)
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    C = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
    _split_empty(C, counts, rng, below=SPLIT_BELOW * n / K if it < split_iters else 0)
    if on_iteration is not None:
      on_iteration()
  return C


def _progressive_kmeans(x, K, n_iter, seed, on_iteration, split_iters, steps=None):
  """K-means in the principal axes of x, first in 1 dimension, then in d^(i/steps)
  dimensions for i = 2..steps, each stage started from the previous centroids padded
  with zeros (faiss's progressive-dimension clustering, its RQ training default).
  The stages before the last see at most PROGRESSIVE_POINTS * K rows (faiss's
  K-means cap, applied by faiss to every stage); the last, in the full space, all."""
  steps = PROGRESSIVE_STEPS if steps is None else steps
  n, d = x.shape
  mean = x.mean(0, dtype=np.float64)
  xc = x - mean.astype(np.float32)
  cov = (xc.T.astype(np.float64) @ xc) / n
  _, V = np.linalg.eigh(cov)
  V = V[:, ::-1].astype(np.float32)  # principal axes, largest variance first
  y = xc @ V
  # The low-dimensional stages only place the seeds: at most PROGRESSIVE_POINTS per
  # centroid take part in them; the last stage (the full space) uses every row.
  rng = np.random.default_rng(seed)
  sub = y if n <= PROGRESSIVE_POINTS * K else y[
      np.sort(rng.choice(n, PROGRESSIVE_POINTS * K, replace=False))]
  C = None
  for i in range(steps):
    di = max(int(d ** ((1 + i) / steps)), 1)
    init = "random" if C is None else np.pad(C, ((0, 0), (0, di - C.shape[1])))
    last = i == steps - 1
    C = kmeans(np.ascontiguousarray((y if last else sub)[:, :di]), K,
               n_iter if last else PROGRESSIVE_ITERS, seed,
               on_iteration if last else None, init, split_iters)
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


def train_rq(x: np.ndarray, K: int, M: int, n_iter: int = 10, seed: int = 0,
             verbose: bool = False, init: str | None = None, refine: int = 0,
             refine_beam: int = 1, split_iters: int | None = None,
             max_points: int | None = None) -> tuple[list[np.ndarray], list[float]]:
  """Greedy residual quantiser in the units of x.

  Cost: M stages of `n_iter` Lloyd iterations, each about 2 n K D flops (the
  distances), so 2 M n_iter n K D in all: linear in K. For 1M vectors of D=128 that
  is 2.6 TFLOP at K=256, M=8 (seconds on a GPU, a few minutes on a 2-core CPU) and
  about 670 TFLOP at K=65536 (hours on that CPU). `verbose` shows a progress bar
  over all M x n_iter iterations, with the time left.

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
  residual = np.array(x, dtype=np.float32, copy=True)
  codebooks, mses = [], []
  with tqdm(total=M * n_iter + refine, desc=f"RQ init (K={K}, M={M})", unit="iter",
            disable=not verbose, leave=False) as bar:
    for m in range(M):
      bar.set_postfix(stage=m)
      C = kmeans(residual, K, n_iter=n_iter, seed=seed + m, on_iteration=bar.update,
                 init=init, split_iters=split_iters, max_points=max_points)
      ids, err = assign(residual, C)
      residual -= C[ids]
      codebooks.append(C)
      mses.append(err / len(x))
    xf = np.asarray(x, np.float32)
    for _ in range(refine):
      bar.set_postfix(stage="refine")
      tables = aq.fit_aq(rq_encode(xf, np.stack(codebooks), refine_beam), xf, K)
      codebooks = list(tables)
      bar.update()
  return codebooks, mses
