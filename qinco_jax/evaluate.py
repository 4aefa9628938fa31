"""Evaluation of a codec on a dataset (spec section 11) and the faiss RQ baseline.

`evaluate` encodes the database (the test set), reports MSE (mse_scale convention),
per-step (dynamic-rate) MSE, 1-recall@{1,10,100} of an exhaustive search of the raw
queries among the decoded database, codebook usage, and encode/decode time.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from qinco_jax import metrics
from qinco_jax.data import Dataset, as_float32


def evaluate(codec, ds: Dataset, A: int | None = None, B: int | None = None,
             n_db: int | None = None, verbose: bool = True) -> dict[str, Any]:
  """Evaluates `codec` on ds.db (and ds.queries/ds.gt when present).

  Returns a JSON-able dict: mse, per_step_mse (list, M values), R@1/R@10/R@100 (fractions;
  only when the full database is used and ground truth exists), codebook usage,
  encode_us and decode_us per vector, A, B.
  """
  db = ds.db if n_db is None else ds.db[:n_db]
  A = codec.cfg.A if A is None else A
  B = codec.cfg.B if B is None else B
  warm = codec.encode(db[:8], A=A, B=B, verbose=False)  # compile before timing
  codec.decode(warm, verbose=False)
  t0 = time.perf_counter()
  codes = codec.encode(db, A=A, B=B, verbose=verbose)
  t1 = time.perf_counter()
  x_hat = codec.decode(codes, verbose=False)
  t2 = time.perf_counter()
  out: dict[str, Any] = {"A": A, "B": B, "n": int(len(db))}
  out["mse"] = metrics.mse(db, x_hat, ds.mse_scale)
  out["per_step_mse"] = [metrics.mse(db, codec.decode(codes[:, :m], verbose=False),
                                     ds.mse_scale) for m in range(1, codec.n_codes)]
  out["per_step_mse"].append(out["mse"])
  out["encode_us"] = 1e6 * (t1 - t0) / max(len(db), 1)
  out["decode_us"] = 1e6 * (t2 - t1) / max(len(db), 1)
  out.update(_recalls(ds, x_hat, n_db))
  usage = metrics.codebook_usage(codes[:, codec.cfg.n_ivf:], codec.K)
  out["mean_entropy"] = usage["mean_entropy"]
  out["min_entropy"] = usage["min_entropy"]
  out["mean_unused_frac"] = usage["mean_unused_frac"]
  return out


def _recalls(ds: Dataset, x_hat: np.ndarray, n_db: int | None) -> dict[str, float]:
  if ds.queries is None or ds.gt is None or (n_db is not None and n_db < len(ds.db)):
    return {}
  I = metrics.knn(as_float32(ds.queries, name="queries"), x_hat, k=100)
  return metrics.recall_at(I, ds.gt)


def faiss_rq_baseline(ds: Dataset, M: int, nbits: int = 8, beam: int = 32,
                      n_train: int = 100_000) -> dict[str, Any]:
  """faiss ResidualQuantizer (beam `beam`) trained on the first n_train training vectors,
  evaluated like `evaluate` (MSE, R@k)."""
  import faiss  # baseline only

  train = as_float32(ds.train[:n_train], name="train")
  rq = faiss.ResidualQuantizer(train.shape[1], M, nbits)
  rq.max_beam_size = beam
  t0 = time.perf_counter()
  rq.train(train)
  t1 = time.perf_counter()
  db = as_float32(ds.db, name="db")
  codes = rq.compute_codes(db)
  t2 = time.perf_counter()
  x_hat = rq.decode(codes)
  t3 = time.perf_counter()
  out = {"method": f"faiss RQ {M}x{nbits} beam {beam}", "train_s": t1 - t0,
         "n_train": len(train), "encode_us": 1e6 * (t2 - t1) / len(db),
         "decode_us": 1e6 * (t3 - t2) / len(db), "mse": metrics.mse(db, x_hat, ds.mse_scale)}
  # MSE of the first m codes (RQ codes are prefix-decodable too): sums of codewords.
  books = faiss.vector_to_array(rq.codebooks).reshape(M, 1 << nbits, -1)
  bits = np.unpackbits(codes, axis=1, bitorder="little")[:, :M * nbits]
  idx = (bits.reshape(len(db), M, nbits).astype(np.int64) << np.arange(nbits)).sum(-1)
  partial = np.zeros_like(db)
  out["per_step_mse"] = []
  for m in range(M):
    partial += books[m][idx[:, m]]
    out["per_step_mse"].append(metrics.mse(db, partial, ds.mse_scale))
  out.update(_recalls(ds, x_hat, None))
  return out
