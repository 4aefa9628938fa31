"""Encode stage: the database's codes in shard files (`encode_shard`), one per slice of
rows, each with a `.json` recording the database it came from; `load_shards` checks
that a set of shards makes up one database and joins them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from qinco_jax import data
from qinco_jax.search.workdir import SearchWorkdir


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
