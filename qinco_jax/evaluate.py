"""Evaluation of a codec or a faiss baseline on a dataset (spec section 11).

`evaluate` encodes the database (the test set), reports MSE (mse_scale convention),
per-step (dynamic-rate) MSE, 1-recall@{1,10,100} of an exhaustive search of the raw
queries among the decoded database, codebook usage, and encode/decode time.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from qinco_jax import metrics
from qinco_jax.baselines import FaissQuantizer
from qinco_jax.data import Dataset, as_float32


def evaluate(codec, ds: Dataset, A: int | None = None, B: int | None = None,
             n_db: int | None = None, verbose: bool = True) -> dict[str, Any]:
  """Evaluates a QINCo2 codec or a `baselines.FaissQuantizer` on ds.db (and
  ds.queries/ds.gt when present), alike.

  Args:
    codec: a `Codec` (encoded at beam A, B; default its training A, B) or a
      `baselines.FaissQuantizer` (trained; A and B do not apply).
    ds: the dataset; its db is the test set.
    n_db: evaluate only the first n_db database vectors (no recall then).
  Returns a JSON-able dict: mse, per_step_mse (list, one value per code column
  that decodes a prefix: M values, M + 1 with an IVF step; empty for PQ/OPQ),
  R@1/R@10/R@100 (fractions; only when the full database is used and ground truth
  exists), codebook usage, encode_us and decode_us per vector, A, B, n.
  """
  if ds.db is None:
    raise ValueError(f"dataset {ds.name!r} has no database vectors (ds.db) to evaluate on")
  db = ds.db if n_db is None else ds.db[:n_db]
  decode: Callable[[Any], np.ndarray]
  prefix: Callable[[Any, int], np.ndarray] | None
  if isinstance(codec, FaissQuantizer):
    A = B = None
    encode = lambda x, verbose=False: _encode_chunks(codec, x, verbose)  # noqa: E731
    decode = codec.decode
    prefix = codec.prefix_decode if codec.additive else None
    n_codes, n_ivf, K = codec.M, 0, codec.K
    db = as_float32(np.asarray(db), name="db")
  else:
    A = codec.cfg.A if A is None else A
    B = codec.cfg.B if B is None else B
    encode = lambda x, **kw: codec.encode(x, A=A, B=B, **kw)  # noqa: E731
    decode = lambda c: codec.decode(c, verbose=False)  # noqa: E731
    prefix = lambda c, m: codec.decode(c[:, :m], verbose=False)  # noqa: E731
    n_codes, n_ivf, K = codec.n_codes, codec.cfg.n_ivf, codec.K
    decode(encode(db[:8], verbose=False))  # compile before timing
  t0 = time.perf_counter()
  codes = encode(db, verbose=verbose)
  t1 = time.perf_counter()
  x_hat = decode(codes)
  t2 = time.perf_counter()
  out: dict[str, Any] = {"A": A, "B": B, "n": int(len(db))}
  out["mse"] = metrics.mse(db, x_hat, ds.mse_scale)
  out["per_step_mse"] = [] if prefix is None else [
      metrics.mse(db, prefix(codes, m), ds.mse_scale) for m in range(1, n_codes)]
  if prefix is not None:
    out["per_step_mse"].append(out["mse"])
  out["encode_us"] = 1e6 * (t1 - t0) / max(len(db), 1)
  out["decode_us"] = 1e6 * (t2 - t1) / max(len(db), 1)
  out.update(_recalls(ds, x_hat, n_db))
  usage = metrics.codebook_usage(codes[:, n_ivf:], K)
  out["mean_entropy"] = usage["mean_entropy"]
  out["min_entropy"] = usage["min_entropy"]
  out["mean_unused_frac"] = usage["mean_unused_frac"]
  return out


def _encode_chunks(q: FaissQuantizer, x, verbose: bool, chunk: int = 8192) -> np.ndarray:
  """q.encode(x) a chunk at a time, with a progress bar when verbose (the same codes:
  each vector is encoded alone)."""
  parts = [q.encode(x[s:s + chunk]) for s in tqdm(
      range(0, len(x), chunk), desc=f"{q.name}: encode", unit="chunk", leave=False,
      disable=not verbose)]
  return np.concatenate(parts) if parts else q.encode(x[:0])


@contextlib.contextmanager
def ticking(desc: str, enabled: bool = True) -> Iterator[None]:
  """Shows `desc` and the time elapsed, updated every second, while the body runs
  (a long call that reports no progress of its own, e.g. faiss training)."""
  if not enabled:
    yield
    return
  bar = tqdm(desc=desc, bar_format="{desc}: {elapsed} elapsed", leave=False)
  stop = threading.Event()

  def tick():
    while not stop.wait(1.0):
      bar.refresh()

  thread = threading.Thread(target=tick, daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()
    bar.close()


def _recalls(ds: Dataset, x_hat: np.ndarray, n_db: int | None) -> dict[str, float]:
  assert ds.db is not None  # checked by evaluate
  if ds.queries is None or ds.gt is None or (n_db is not None and n_db < len(ds.db)):
    return {}
  I = metrics.knn(as_float32(ds.queries, name="queries"), x_hat, k=100)
  return metrics.recall_at(I, ds.gt)


def faiss_rq_baseline(ds: Dataset, M: int, nbits: int = 8, beam: int = 32,
                      n_train: int = 100_000, verbose: bool = False) -> dict[str, Any]:
  """faiss ResidualQuantizer (M steps of nbits, beam `beam`) trained on the first
  n_train training vectors, evaluated by `evaluate` (MSE, per-step MSE, R@k).
  verbose: the training's elapsed time, then the encoding's progress."""
  q = FaissQuantizer("RQ", ds.d, M, nbits=nbits, beam=beam)
  n = int(min(n_train, len(ds.train)))
  t0 = time.perf_counter()
  with ticking(f"{q.name}: training on {n:,} vectors", verbose):
    q.train(ds.train[:n_train])
  train_s = time.perf_counter() - t0
  return {"method": q.name, "train_s": train_s, "n_train": n,
          **evaluate(q, ds, verbose=verbose)}
