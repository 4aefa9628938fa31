"""IVF stage (spec 8.2, 12.1): coarse centroids with faiss K-means and list assignment.

The centroids are trained in raw units (100 Lloyd iterations by default) and saved as
`.npy`; a codec built with `QincoConfig(ivf_K=...)` freezes them as its step 0, so
codes get M + 1 columns, column 0 being the list id.
"""

from __future__ import annotations

import os

import numpy as np

from qinco_jax import data


def train_centroids(x, ivf_K: int, niter: int = 100, seed: int = 0,
                    max_points: int | None = None, verbose: bool = False) -> np.ndarray:
  """faiss K-means on the rows of x (n, d). Returns (ivf_K, d) float32 centroids."""
  import faiss

  x = data.as_float32(np.asarray(x if max_points is None else x[:max_points]),
                      name="IVF training vectors")
  if len(x) < ivf_K:
    raise ValueError(f"IVF K-means needs at least ivf_K={ivf_K} vectors, got {len(x)}")
  km = faiss.Kmeans(x.shape[1], ivf_K, niter=niter, seed=seed, verbose=verbose,
                    max_points_per_centroid=max(256, -(-len(x) // ivf_K)))
  km.train(x)
  return np.ascontiguousarray(km.centroids, dtype=np.float32)


def save_centroids(path: str | os.PathLike, centroids: np.ndarray):
  data.write_vecs(str(path), np.asarray(centroids, np.float32))


def load_centroids(path: str | os.PathLike) -> np.ndarray:
  return np.ascontiguousarray(data.read_vecs(str(path), mmap=False), dtype=np.float32)
