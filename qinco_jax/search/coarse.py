"""IVF stage: the coarse quantiser's centroids (`train_ivf`), saved in the work directory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qinco_jax import ivf
from qinco_jax.search.workdir import SearchWorkdir


def train_ivf(train_x, ivf_K: int, out_dir: str | os.PathLike, niter: int = 100,
              seed: int = 0, max_points: int | None = None) -> np.ndarray:
  """IVF stage: centroids saved to `SearchWorkdir(out_dir).centroids`."""
  c = ivf.train_centroids(train_x, ivf_K, niter=niter, seed=seed, max_points=max_points)
  Path(out_dir).mkdir(parents=True, exist_ok=True)
  ivf.save_centroids(SearchWorkdir(out_dir).centroids, c)
  return c
