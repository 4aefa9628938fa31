"""Build stage, decoders: the least-squares AQ tables and the pairwise decoder fitted on
encoded training vectors (spec 12.1 steps 3-4, 12.2), which the index scans and
re-ranks with (`index.Index.train`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from qinco_jax import aq, data, pairwise

N_AQ_TRAIN = 1_000_000  # aq_training_samples (spec 10)


def extra_codes_K(ivf_K: int, K: int = 256) -> int:
  """Codewords per stage of the IVF-derived extra codes of the pairwise decoder.

  The spec's 256 suits 2^20 IVF lists (4,096 lists per codeword). With few lists the
  extra codes would nearly repeat the list id, and a pair table (code, extra code)
  would have too few training vectors per entry, so we keep >= 64 lists per codeword:
  min(K, max(16, ivf_K // 64)), i.e. 16 for 1,024 lists, 64 for 4,096. On the GloVe
  search default (1,024 lists, same shrinkage) this took the pairwise decoder's
  database MSE from 2.494 to 2.452 (AQ: 2.539; measured with the extra codes' earlier,
  faiss-based K-means; see docs/design.md).
  """
  return int(min(K, max(16, ivf_K // 64)))


@dataclasses.dataclass
class Decoders:
  """What `fit_decoders` fits: raw IVF centroids (K_IVF, D), least-squares AQ tables
  (M, K, D), the pairwise decoder and the IVF-derived extra codes (K_IVF, 5), plus
  the training codes (n, M + 1) they were fitted on (the index fits the levels of its
  norm byte on them)."""
  centroids: np.ndarray
  tables: np.ndarray
  pairwise: pairwise.PairwiseDecoder
  extra: np.ndarray
  train_codes: np.ndarray


def fit_decoders(codec, train_x, *, A: int | None = None, B: int | None = None,
                 n_aq_train: int = N_AQ_TRAIN, n_pairwise_codebooks: int = 2,
                 pairwise_mode: str = "aq_refine",
                 pairwise_shrink: float | tuple[float, ...] = (1.0, 4.0, 16.0, 64.0, 256.0),
                 pairwise_target: str = "decoded", extra_K: int | None = None,
                 verbose: bool = True, train_codes=None) -> Decoders:
  """Fits the AQ and pairwise decoders on encoded training vectors (`index.Index.train`).

  Args:
    codec: IVF-QINCo2 codec (cfg.ivf_K > 0).
    train_x: (n, D) raw training vectors (the first n_aq_train are encoded).
    A, B: encoding beam of the training vectors.
    train_codes: optional codes of train_x (rows in the same order), e.g. a slice of
      the database codes when the database contains the training set: skips
      re-encoding.
    pairwise_mode: "aq_refine" (default): up to 2M pair tables fitted on the residual
      of the AQ decoder, with shrunk group means (`pairwise_shrink`) and pairs chosen
      and stopped on held-out training rows, so the decoder is never worse than AQ on
      unseen vectors; "spec": the plain greedy fit of spec 12.2 (over-fits unless the
      training set is much larger than K^2 = 65,536 per table).
    pairwise_shrink: "aq_refine" only: shrinkage of the group means; with several
      values each table takes the one best on held-out training rows.
    pairwise_target: "decoded" (default, ours): the pair tables approximate the full
      QINCo2 decoding of the training codes, which is what the shortlist is re-ranked
      by, and a target without the quantisation noise over-fits far less; "raw": the
      training vectors themselves (the spec).
    extra_K: codewords per stage of the 5 IVF-derived extra codes (default
      `extra_codes_K(ivf_K, K)`: the spec's 256 for 2^20 lists, 16 for 1024).
  """
  if pairwise_mode not in ("aq_refine", "spec"):
    raise ValueError(f"pairwise_mode must be 'aq_refine' or 'spec', got {pairwise_mode!r}")
  if pairwise_target not in ("decoded", "raw"):
    raise ValueError(f"pairwise_target must be 'decoded' or 'raw', got {pairwise_target!r}")
  if not codec.cfg.ivf_K:
    raise ValueError("the search pipeline needs an IVF-QINCo2 codec (cfg.ivf_K > 0)")
  m = codec.model()
  std, mean = float(m.data_std[...]), np.asarray(m.data_mean[...])
  centroids = np.asarray(m.ivf_centroids[...]) * std + mean  # raw units
  x = data.as_float32(np.asarray(train_x[:n_aq_train]), name="train_x")
  if train_codes is not None:  # already encoded (the database holds the training set)
    codes = data.check_int_matrix(np.asarray(train_codes[: len(x)]), "train_codes")
    if codes.shape != (len(x), codec.n_codes):
      raise ValueError(f"train_codes: expected shape ({len(x)}, {codec.n_codes}) (one "
                       f"row per training vector used), got {codes.shape}")
  else:
    codes = codec.encode(x, A=A, B=B, verbose=verbose)
  r = x - centroids[codes[:, 0]]
  tables = aq.fit_aq(codes[:, 1:], r, codec.K)
  sizes = np.bincount(codes[:, 0], minlength=codec.cfg.ivf_K)
  extra = pairwise.ivf_extra_codes(
      centroids, sizes, K=extra_K or extra_codes_K(codec.cfg.ivf_K, codec.K))
  ext = pairwise.extended_codes(codes[:, 1:], codes[:, 0], extra)
  n_tables = n_pairwise_codebooks * codec.M
  if pairwise_target == "decoded":
    r = codec.decode(codes, verbose=verbose) - centroids[codes[:, 0]]
  if pairwise_mode == "spec":
    pw = pairwise.fit_pairwise(ext, r, codec.K, n_tables, verbose=verbose)
  else:
    pw = pairwise.fit_pairwise(ext, r - aq.aq_decode(tables, codes[:, 1:]), codec.K,
                               n_tables, verbose=verbose, shrink=pairwise_shrink,
                               holdout=max(1, min(100_000, len(x) // 5)))
    pw.base_tables = tables
  return Decoders(centroids, tables, pw, extra, codes)
