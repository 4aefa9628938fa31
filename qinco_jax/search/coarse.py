"""IVF stage: the coarse quantiser, its centroids and the search over them.

Centroids (`train_ivf`): faiss's exact K-means up to EXACT_KMEANS_MAX lists; above,
a two-level K-means in JAX (`two_level_kmeans`): sqrt(K) coarse clusters, then each
coarse cluster split into a number of lists proportional to its rows, all groups
run as batched Lloyd iterations on device (`_lloyd_groups`, jitted; the group axis
is split over the local devices). Per iteration it scores every row against the
lists of its own group only, so its cost is rows x (sqrt(K) + K / sqrt(K)) instead of
rows x K: at 65,536 lists, 256 + ~256 distances per row instead of 65,536.

List search (`build_coarse`, `search_lists`): an exact (flat) faiss index up to
FLAT_COARSE_MAX lists, an HNSW graph above (efConstruction at build, efSearch per
call; `list_search_recall` measures it against exact). The encoder takes its IVF
candidates from the same search (`candidates`), so 2^20 centroids are not all scored
per vector.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qinco_jax import data, ivf, rq_init
from qinco_jax.search.workdir import SearchWorkdir

FLAT_COARSE_MAX = 4096  # kind="auto": exact list search up to this many lists
# efConstruction of an HNSW list search (docs/benchmarks.md, "List search settings": at
# 65,536 K-means lists 200 takes the recall of the 64 nearest lists at efSearch 256 from
# 0.74 (40) to 0.95, for ~5x the build time)
EF_CONSTRUCTION = 200
HNSW_M = 32  # neighbours per node of an HNSW list search (faiss's HNSW32)
HNSW_ADD_ROWS = 1 << 16  # centroids added to the HNSW graph per call (progress)
# efSearch of the encoder's IVF candidates (docs/benchmarks.md, "List search settings":
# at 2^20 lists, efConstruction 200, 256 gave 0.003 more vectors the exhaustive codes
# than 128 for 28% fewer vectors per CPU-second)
ENCODE_EF_SEARCH = 128
EXACT_KMEANS_MAX = 8192  # train_ivf: faiss's exact K-means up to this many lists
ROWS_PER_LIST = 64  # two-level K-means: training rows per list (sampled)
TWO_LEVEL_ITERS = 20  # two-level K-means: Lloyd iterations per level
BATCH_DISTANCES = 1 << 25  # two-level K-means: row x list distances per device call
Kind = Literal["auto", "flat", "hnsw"]


def _faiss() -> Any:
  import faiss
  return faiss


# ---------------------------------------------------------------- list search
def build_coarse(centroids: np.ndarray, kind: str = "auto",
                 ef_construction: int = EF_CONSTRUCTION, metric: str = "l2",
                 verbose: bool = False, hnsw_M: int = HNSW_M) -> Any:
  """A faiss index over the raw centroids (K, D): flat (exact) or HNSW with hnsw_M
  neighbours per node (added in blocks of HNSW_ADD_ROWS, with a progress bar when
  verbose)."""
  faiss = _faiss()
  centroids = np.ascontiguousarray(centroids, np.float32)
  K, D = centroids.shape
  fm = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
  if kind == "auto":
    kind = "flat" if K <= FLAT_COARSE_MAX else "hnsw"
  if kind == "flat":
    index = faiss.IndexFlat(D, fm)
  elif kind == "hnsw":
    if ef_construction < 1:
      raise ValueError(f"ef_construction must be >= 1, got {ef_construction}")
    if hnsw_M < 2:
      raise ValueError(f"hnsw_M must be >= 2, got {hnsw_M}")
    index = faiss.IndexHNSWFlat(D, int(hnsw_M), fm)
    index.hnsw.efConstruction = int(ef_construction)
  else:
    raise ValueError(f"coarse must be 'auto', 'flat' or 'hnsw', got {kind!r}")
  step = HNSW_ADD_ROWS if kind == "hnsw" else max(1, K)
  with tqdm(total=K, desc="ivf: list search (HNSW)", unit="list", unit_scale=True,
            disable=not verbose or kind != "hnsw") as bar:
    for s in range(0, K, step):
      index.add(centroids[s:s + step])
      bar.update(min(step, K - s))
  return index


def is_exact(coarse) -> bool:
  return not isinstance(coarse, _faiss().IndexHNSW)


def search_lists(coarse, q: np.ndarray, k: int, ef_search: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """The k lists nearest each raw query (nq, D): (scores (nq, k) float32, lists (nq, k)
  int64; -1 where an HNSW search finds fewer). efSearch goes in per call (an exact
  search ignores it), so concurrent calls change nothing shared."""
  faiss = _faiss()
  k = int(min(k, coarse.ntotal))
  params = None if is_exact(coarse) else faiss.SearchParametersHNSW(efSearch=int(ef_search))
  D, I = coarse.search(np.ascontiguousarray(q, np.float32), k, params=params)
  return np.ascontiguousarray(D, np.float32), np.ascontiguousarray(I, np.int64)


def candidates(coarse, k: int, ef_search: int) -> Callable[[np.ndarray], np.ndarray]:
  """The encoder's IVF candidates (`Codec.encode(ivf_candidates=...)`): the k lists
  the coarse search (an L2 one) finds for each raw vector."""
  return lambda x: search_lists(coarse, x, k, ef_search)[1]


def list_search_recall(coarse, centroids: np.ndarray, q: np.ndarray, nprobe: int,
                       ef_values: Sequence[int]) -> dict[int, float]:
  """Recall of the list search against exact: the fraction of the nprobe nearest
  centroids of each query (exact L2) that the coarse search returns, per efSearch."""
  exact = build_coarse(centroids, "flat")
  _, want = search_lists(exact, q, nprobe, 0)
  out = {}
  for ef in ef_values:
    _, got = search_lists(coarse, q, nprobe, ef)
    out[int(ef)] = float(np.mean([len(np.intersect1d(a, b)) for a, b in zip(got, want)])
                         / want.shape[1])
  return out


def save_coarse(path: str | os.PathLike, coarse) -> None:
  faiss = _faiss()
  tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
  faiss.write_index(coarse, str(tmp))
  os.replace(tmp, path)


def load_coarse(path: str | os.PathLike) -> Any:
  return _faiss().read_index(str(path))


# ---------------------------------------------------------------- centroids
@functools.partial(jax.jit, static_argnames=("n_iter",))
def _lloyd_groups(x, w, C, cmask, n_iter: int):
  """n_iter Lloyd iterations in each of G independent groups.

  Args:
    x: (G, R, D) rows (padding rows have weight 0). w: (G, R) row weights.
    C: (G, Kg, D) starting centroids. cmask: (G, Kg) True for a group's real lists.
  Returns:
    (G, Kg, D) centroids (an empty list keeps its place).
  """
  xx = jnp.sum(x * x, -1, keepdims=True)

  def one(_, C):
    d = xx - 2.0 * jnp.einsum("grd,gkd->grk", x, C) + jnp.sum(C * C, -1)[:, None, :]
    d = jnp.where(cmask[:, None, :], d, jnp.inf)
    a = jax.nn.one_hot(jnp.argmin(d, -1), C.shape[1], dtype=x.dtype) * w[..., None]
    sums = jnp.einsum("grk,grd->gkd", a, x)
    cnt = jnp.sum(a, 1)[..., None]
    return jnp.where(cnt > 0, sums / jnp.maximum(cnt, 1e-30), C)

  return jax.lax.fori_loop(0, n_iter, one, C)


def allocate(sizes: np.ndarray, K: int) -> np.ndarray:
  """Lists per coarse cluster, proportional to its rows (largest remainders), each
  at least 1 and at most its rows, summing to K (sum(sizes) >= K)."""
  sizes = np.asarray(sizes, np.int64)
  share = K * sizes / sizes.sum()
  k = np.minimum(np.maximum(np.floor(share).astype(np.int64), 1), sizes)
  while k.sum() != K:
    room = sizes - k
    if k.sum() < K:
      pick = np.argmax(np.where(room > 0, share - k, -np.inf))
      k[pick] += 1
    else:
      pick = np.argmax(np.where(k > 1, k - share, -np.inf))
      k[pick] -= 1
  return k


def two_level_kmeans(x, K: int, n_iter: int = TWO_LEVEL_ITERS, seed: int = 0,
                     rows_per_list: int = ROWS_PER_LIST, K1: int | None = None,
                     verbose: bool = False) -> np.ndarray:
  """K centroids by a two-level K-means (module docstring).

  Args:
    x: (n, D) training vectors, any real dtype (a memmap is read row by row: only the
      sampled rows, at most rows_per_list * K, are held, in their own dtype).
    K: lists; K1: coarse clusters (default round(sqrt(K))).
  Returns:
    (K, D) float32 centroids.
  """
  rng = np.random.default_rng(seed)
  n = len(x)
  if n < K:
    raise ValueError(f"two-level K-means needs at least K={K} training vectors, got {n}")
  take = np.sort(rng.choice(n, min(n, rows_per_list * K), replace=False))
  xs = np.asarray(x[take])
  K1 = K1 or max(1, int(round(np.sqrt(K))))
  top_rows = xs[rng.choice(len(xs), min(len(xs), 256 * K1), replace=False)]
  with tqdm(total=n_iter, desc=f"ivf: {K1} coarse clusters", disable=not verbose) as bar:
    C1 = rq_init.kmeans(data.as_float32(top_rows), K1, n_iter=n_iter, seed=seed,
                        on_iteration=lambda: bar.update(1))
  assign = np.concatenate([rq_init.assign(data.as_float32(xs[s:s + (1 << 18)]), C1)[0]
                           for s in range(0, len(xs), 1 << 18)])
  order = np.argsort(assign, kind="stable")
  sizes = np.bincount(assign, minlength=K1)
  k_of = allocate(sizes, K)
  starts = np.concatenate([[0], np.cumsum(sizes)])
  out = np.empty((K, xs.shape[1]), np.float32)
  first_list = np.concatenate([[0], np.cumsum(k_of)])
  groups = [g for g in np.argsort(-sizes, kind="stable") if sizes[g]]
  ndev = jax.local_device_count()
  with tqdm(total=len(xs), desc=f"ivf: {K} lists", unit="vec", unit_scale=True,
            disable=not verbose) as bar:
    i = 0
    while i < len(groups):
      R = _bucket(sizes[groups[i]])  # groups by decreasing size: the batch's largest
      Kg = _bucket(int(k_of[groups[i:i + max(1, (1 << 16) // R)]].max()))
      G = max(1, BATCH_DISTANCES // (R * Kg))
      G = -(-G // ndev) * ndev if ndev > 1 else G
      batch = groups[i:i + G]
      Kg = _bucket(int(k_of[batch].max()))
      xb = np.zeros((G, R, xs.shape[1]), np.float32)
      wb = np.zeros((G, R), np.float32)
      Cb = np.zeros((G, Kg, xs.shape[1]), np.float32)
      mb = np.zeros((G, Kg), bool)
      for j, g in enumerate(batch):
        rows = xs[order[starts[g]:starts[g + 1]]]
        xb[j, :len(rows)] = rows
        wb[j, :len(rows)] = 1.0
        kg = int(k_of[g])
        Cb[j, :kg] = rows[rng.choice(len(rows), kg, replace=False)]
        mb[j, :kg] = True
      C = np.asarray(_lloyd_groups(*_place(xb, wb, Cb, mb, ndev), n_iter=n_iter))
      for j, g in enumerate(batch):
        out[first_list[g]:first_list[g + 1]] = C[j, :k_of[g]]
      bar.update(int(sizes[batch].sum()))
      i += len(batch)
  return out


def _bucket(v: int) -> int:
  """The next power of two (few distinct shapes, so few compilations)."""
  return 1 << max(0, int(v - 1).bit_length())


def _place(xb, wb, Cb, mb, ndev):
  if ndev == 1:
    return xb, wb, Cb, mb
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
  return tuple(jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (xb, wb, Cb, mb))


def train_ivf(train_x, ivf_K: int, out_dir: str | os.PathLike, niter: int = 100,
              seed: int = 0, max_points: int | None = None, method: str = "auto",
              ef_construction: int = EF_CONSTRUCTION, verbose: bool = False) -> np.ndarray:
  """IVF stage: (ivf_K, D) float32 centroids of the rows of train_x, saved to
  `SearchWorkdir(out_dir).centroids`, and the list search over them to `.coarse` (built
  once, used by the encode and build stages).

  method: "exact" (faiss K-means, niter iterations on at most max_points rows),
    "two_level" (`two_level_kmeans`, TWO_LEVEL_ITERS iterations per level), or "auto"
    (exact up to EXACT_KMEANS_MAX lists).
  """
  if ivf_K < 1:
    raise ValueError(f"ivf_K must be >= 1, got {ivf_K}")
  if method == "auto":
    method = "exact" if ivf_K <= EXACT_KMEANS_MAX else "two_level"
  if method == "exact":
    c = ivf.train_centroids(train_x, ivf_K, niter=niter, seed=seed, max_points=max_points,
                            verbose=verbose)
  elif method == "two_level":
    c = two_level_kmeans(train_x, ivf_K, seed=seed, verbose=verbose)
  else:
    raise ValueError(f"method must be 'auto', 'exact' or 'two_level', got {method!r}")
  wd = SearchWorkdir(out_dir)
  Path(out_dir).mkdir(parents=True, exist_ok=True)
  save_coarse(wd.coarse, build_coarse(c, ef_construction=ef_construction, verbose=verbose))
  ivf.save_centroids(wd.centroids, c)
  return c
