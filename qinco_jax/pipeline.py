"""Offline stages of the large-scale search pipeline (spec 12.1), one function each,
and `SearchWorkdir`, the one place that names the files of a search work directory:

  ivf     -> centroids_ivf.npy               faiss K-means on training vectors
  train   -> train/ (IVF-QINCo2)             `trainer.train_and_evaluate`, ivf_centroids
  encode  -> codes_db.{i:04d}of{n:04d}.npy   the database in shards (`encode_shard`),
             (+ .json: the database each came from)
  build   -> index/                          `ann.Index`: `fit_decoders` (AQ tables,
                                             pairwise decoder) + the codes injected
  search  -> sweep.jsonl, sweep.png          `ann.load_index(...).searcher()` swept
  every stage -> command.{stage}.txt         the command line that ran it

Everything lives in one directory so each stage can run in its own process (or host)
and the index reloads in a fresh process (`bigann.run` strings the stages together).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from qinco_jax import aq, data, ivf, pairwise

N_AQ_TRAIN = 1_000_000  # aq_training_samples (spec 10)


@dataclasses.dataclass(frozen=True)
class SearchWorkdir:
  """The files of a search job's work directory (see the module docstring)."""

  root: Path

  def __init__(self, root: str | os.PathLike):
    object.__setattr__(self, "root", Path(root))

  centroids = property(lambda self: self.root / "centroids_ivf.npy")
  model = property(lambda self: self.root / "train")  # the trainer's workdir
  codes = "codes_db"  # shard name prefix (`encode_shard`, `load_shards`)
  index = property(lambda self: self.root / "index")  # `ann.Index.save`
  sweep_log = property(lambda self: self.root / "sweep.jsonl")
  sweep_plot = property(lambda self: self.root / "sweep.png")
  tune_log = property(lambda self: self.root / "sweep_tune.jsonl")  # bench_search
  bench = property(lambda self: self.root / "bench_search.json")  # bench_search

  def command(self, stage: str) -> Path:
    return self.root / f"command.{stage}.txt"


def shard_range(n: int, shard: int, n_shards: int) -> tuple[int, int]:
  """Contiguous [start, end) rows of shard `shard` out of `n_shards`."""
  if not 0 <= shard < n_shards:
    raise ValueError(f"shard must be in [0, {n_shards}), got {shard}")
  return n * shard // n_shards, n * (shard + 1) // n_shards


def fingerprint(x) -> str:
  """A cheap fingerprint of a database: its shape, dtype and 64 rows spread over it
  (first and last included). Two versions of a file that differ in size or in those
  rows get different fingerprints; reading it costs 64 row reads, not a pass."""
  n = len(x)
  rows = np.unique(np.linspace(0, max(n - 1, 0), num=min(n, 64)).astype(np.int64))
  h = hashlib.blake2b(f"{tuple(x.shape)}{np.dtype(x.dtype).str}".encode(), digest_size=8)
  if n:
    h.update(np.ascontiguousarray(np.asarray(x[rows])).tobytes())
  return h.hexdigest()


def _shard_path(out_dir, name: str, shard: int, n_shards: int) -> Path:
  return Path(out_dir) / f"{name}.{shard:04d}of{n_shards:04d}.npy"


def encode_shard(codec, x, out_dir: str | os.PathLike, shard: int = 0,
                 n_shards: int = 1, A: int | None = None, B: int | None = None,
                 name: str = SearchWorkdir.codes) -> Path:
  """Encodes rows of shard `shard` of x and writes `{name}.{shard:04d}of{n:04d}.npy`,
  with a `.json` beside it recording the database it came from (rows, fingerprint)."""
  s, e = shard_range(len(x), shard, n_shards)
  codes = codec.encode(x[s:e], A=A, B=B)
  path = _shard_path(out_dir, name, shard, n_shards)
  data.write_vecs(str(path), codes.astype(np.int32))
  record = {"n_db": int(len(x)), "rows": [int(s), int(e)], "fingerprint": fingerprint(x),
            "A": A, "B": B}
  data.atomic_write(str(path.with_suffix(".json")),
                    lambda f: f.write(json.dumps(record).encode()))
  return path


def load_shards(out_dir: str | os.PathLike, name: str = SearchWorkdir.codes,
                db=None) -> np.ndarray:
  """Concatenates the shards written by `encode_shard` (each memory-mapped).

  Refuses a set of shards that does not make up one database: shards of different
  splits (`0000of0002` beside `0001of0003`), missing ones, or, with `db` given, shards
  encoded from another version of it (row count or fingerprint differ).
  """
  paths = sorted(Path(out_dir).glob(f"{name}.*of*.npy"))
  if not paths:
    raise FileNotFoundError(f"no {name}.*of*.npy shards in {str(out_dir)!r}")
  splits: dict[int, set[int]] = {}
  for p in paths:
    i, n = (int(v) for v in p.name[len(name) + 1:-4].split("of"))
    splits.setdefault(n, set()).add(i)
  if len(splits) > 1:
    found = ", ".join(f"{len(v)} of {n}" for n, v in sorted(splits.items()))
    raise ValueError(f"{str(out_dir)!r} holds {name} shards of {len(splits)} different "
                     f"splits ({found}): remove the stale ones (each encode run writes "
                     "one split)")
  (n_expected, have), = splits.items()
  extra = sorted(have - set(range(n_expected)))
  if extra:
    raise ValueError(f"{str(out_dir)!r}: {name} shards {extra} do not exist in a split "
                     f"of {n_expected}: remove them")
  missing = sorted(set(range(n_expected)) - have)
  if missing:
    raise ValueError(f"{str(out_dir)!r}: {name} shards {missing} of {n_expected} are "
                     "missing; encode them first")
  if db is not None:
    want = {"n_db": int(len(db)), "fingerprint": fingerprint(db)}
    for i, p in enumerate(paths):
      meta_path = p.with_suffix(".json")
      if not meta_path.exists():
        raise ValueError(f"{str(p)!r} records no database (no {meta_path.name}): "
                         "re-encode it")
      meta = json.loads(meta_path.read_text())
      if meta.get("n_db") != want["n_db"] or meta.get("fingerprint") != want["fingerprint"]:
        raise ValueError(
            f"{str(p)!r} was encoded from another database ({meta.get('n_db')} rows, "
            f"fingerprint {meta.get('fingerprint')}) than this one ({want['n_db']} rows, "
            f"{want['fingerprint']}): re-encode the shards of this database")
      s, e = shard_range(len(db), i, n_expected)
      if meta.get("rows") != [s, e]:
        raise ValueError(f"{str(p)!r} holds rows {meta.get('rows')}, expected {[s, e]}")
  return np.concatenate([np.load(p, mmap_mode="r") for p in paths])


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
  """Fits the AQ and pairwise decoders on encoded training vectors (`ann.Index.train`).

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


def train_ivf(train_x, ivf_K: int, out_dir: str | os.PathLike, niter: int = 100,
              seed: int = 0, max_points: int | None = None) -> np.ndarray:
  """IVF stage: centroids saved to `SearchWorkdir(out_dir).centroids`."""
  c = ivf.train_centroids(train_x, ivf_K, niter=niter, seed=seed, max_points=max_points)
  Path(out_dir).mkdir(parents=True, exist_ok=True)
  ivf.save_centroids(SearchWorkdir(out_dir).centroids, c)
  return c
