"""Encode stage: the database's codes in shard files, one per slice of rows.

`encode_shard` streams a slice of the database through the codec and writes its
codes in their own width (`Codec.pack_codes`: the list id in as few bytes as ivf_K
needs, then M bytes for K = 256; 11 bytes a vector at 2^20 lists and M = 8) to
`{name}.{i:04d}of{n:04d}.npy`, then a `.json` beside it recording what it came from:
the database (rows, a fingerprint), the codec (a fingerprint of its arrays) and the
beam. Memory is O(ENCODE_ROWS), whatever the shard's size; a shard whose `.json`
matches is not encoded again (a killed encode stage resumes). `find_shards` checks
that a set of shards makes up one database encoded by one codec; `iter_shard` reads
one back in chunks, `load_shards` joins them all in memory."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from qinco_jax import checkpoint, data, packing
from qinco_jax.search.workdir import SearchWorkdir

ENCODE_ROWS = 1 << 16  # rows encoded and written at a time
READ_ROWS = 1 << 20  # rows read back at a time by `iter_shard`


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


def codec_fingerprint(codec) -> str:
  """blake2b of a codec's config, dimension and the checksums of its arrays."""
  h = hashlib.blake2b(digest_size=8)
  h.update(json.dumps({"d": codec.d, "config": codec.cfg.to_dict(),
                       "arrays": checkpoint.checksums(codec.state)},
                      sort_keys=True, default=str).encode())
  return h.hexdigest()


def shard_path(out_dir, name: str, shard: int, n_shards: int) -> Path:
  return Path(out_dir) / f"{name}.{shard:04d}of{n_shards:04d}.npy"


def _record(codec, x, shard: int, n_shards: int, A, B) -> dict:
  s, e = shard_range(len(x), shard, n_shards)
  return {"n_db": int(len(x)), "rows": [int(s), int(e)], "fingerprint": fingerprint(x),
          "A": A, "B": B, "codec": codec_fingerprint(codec),
          **field_record(codec._field_bits())}


def field_record(bits: list[int]) -> dict:
  """How a shard's record names its packed layout: "fields" (byte widths) when every
  field is whole bytes, as shards have always recorded it, else "bits" (4-bit codes)."""
  if all(w % 8 == 0 for w in bits):
    return {"fields": [w // 8 for w in bits]}
  return {"bits": list(bits)}


def _read_json(path: Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def encode_shard(codec, x, out_dir: str | os.PathLike, shard: int = 0,
                 n_shards: int = 1, A: int | None = None, B: int | None = None,
                 name: str = SearchWorkdir.codes, verbose: bool = False,
                 encode_kw: dict | None = None) -> Path:
  """Encodes rows `shard_range(len(x), shard, n_shards)` of x (n, d) and writes their
  packed codes (uint8) and the `.json` record; returns the shard's path. A shard
  whose record matches (same database, rows, codec and beam) is kept as it is.
  `encode_kw`: more arguments of `codec.encode`."""
  s, e = shard_range(len(x), shard, n_shards)
  path = shard_path(out_dir, name, shard, n_shards)
  meta_path = path.with_suffix(".json")
  record = _record(codec, x, shard, n_shards, A, B)
  if _read_json(meta_path) == record and path.is_file():
    return path  # finished earlier
  if meta_path.exists():
    meta_path.unlink()  # the codes below replace what it described
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, "wb") as f, tqdm(total=e - s, desc=f"encode {shard + 1}/{n_shards}",
                                    unit="vec", unit_scale=True, disable=not verbose) as bar:
      np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                               "shape": (e - s, codec.code_size)})
      for b in range(s, e, ENCODE_ROWS):
        chunk = x[b:min(b + ENCODE_ROWS, e)]
        codes = codec.encode(chunk, A=A, B=B, verbose=False, **(encode_kw or {}))
        f.write(codec.pack_codes(codes).tobytes())
        bar.update(len(chunk))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  data.atomic_write(str(meta_path), lambda f: f.write(json.dumps(record).encode()))
  return path


def unpack(b: np.ndarray, meta: dict) -> np.ndarray:
  """(n, row bytes) uint8 packed codes -> (n, n_codes) int32, by the layout the shard's
  record names (`field_record`; `Codec.pack_codes` wrote them); shards written before
  the packed layout hold one code per byte."""
  if "bits" in meta:
    return packing.unpack_fields(b, meta["bits"]).astype(np.int32)
  if "fields" in meta:
    return packing.unpack_fields(b, [8 * nb for nb in meta["fields"]]).astype(np.int32)
  return np.asarray(b).astype(np.int32)


def iter_shard(path: str | os.PathLike, meta: dict, rows: int = READ_ROWS):
  """Yields (start, codes (n, n_codes) int32) over a shard, `rows` at a time, read
  from a memory map (so memory is O(rows))."""
  raw = np.load(path, mmap_mode="r")
  for s in range(0, len(raw), rows):
    block = np.asarray(raw[s:s + rows])
    yield s, unpack(block, meta)


def find_shards(out_dir: str | os.PathLike, name: str = SearchWorkdir.codes, db=None,
                codec=None) -> list[tuple[Path, dict]]:
  """The shards written by `encode_shard`, in order, with their records.

  Refuses a set of shards that does not make up one database: shards of different
  splits (`0000of0002` beside `0001of0003`), missing ones, or, with `db` given,
  shards encoded from another version of it (row count or fingerprint differ); with
  `codec` given, shards encoded by another codec.
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
  metas = [_read_json(p.with_suffix(".json")) or {} for p in paths]
  if db is not None:
    want = {"n_db": int(len(db)), "fingerprint": fingerprint(db)}
    for i, (p, meta) in enumerate(zip(paths, metas)):
      if not meta:
        raise ValueError(f"{str(p)!r} records no database (no {p.with_suffix('.json').name}"
                         "): re-encode it")
      if meta.get("n_db") != want["n_db"] or meta.get("fingerprint") != want["fingerprint"]:
        raise ValueError(
            f"{str(p)!r} was encoded from another database ({meta.get('n_db')} rows, "
            f"fingerprint {meta.get('fingerprint')}) than this one ({want['n_db']} rows, "
            f"{want['fingerprint']}): re-encode the shards of this database")
      s, e = shard_range(len(db), i, n_expected)
      if meta.get("rows") != [s, e]:
        raise ValueError(f"{str(p)!r} holds rows {meta.get('rows')}, expected {[s, e]}")
  if codec is not None:
    fp = codec_fingerprint(codec)
    for p, meta in zip(paths, metas):
      if meta.get("codec") != fp:
        raise ValueError(f"{str(p)!r} was encoded by another codec (fingerprint "
                         f"{meta.get('codec')}) than this one ({fp}): re-encode the shards "
                         "with this codec (--stage=encode)")
  return list(zip(paths, metas))


def load_shards(out_dir: str | os.PathLike, name: str = SearchWorkdir.codes, db=None,
                codec=None) -> np.ndarray:
  """All the codes of the shards (`find_shards`'s checks), joined in memory:
  (n, n_codes) int32."""
  found = find_shards(out_dir, name, db, codec)
  return np.concatenate([c for p, meta in found for _, c in iter_shard(p, meta)])
