"""`Index`: an IVF-QINCo2 nearest-neighbour index with faiss's interface.

    index = qj.Index(codec)              # an IVF-QINCo2 codec (cfg.ivf_K > 0)
    index.train(xt)                      # AQ and pairwise decoders, on encoded xt
    index.add(xb)                        # encode and store (call again to add more)
    D, I = index.search(xq, 10, nprobe=16)
    index.remove_ids(np.array([3, 7]))   # in memory; path=...: on disk (compaction)
    index.save("my_index"); index = qj.load_index("my_index")   # memory-mapped lists
    index.add_shards(shards, "big_index")  # a database larger than memory (search.build)

It is the build and search stages of the search job (`job`): it wraps the decoders
of `decoders.fit_decoders`, the inverted lists holding the codes and the query path of
`query.Searcher`. The lists depend on the codec's K: 8-bit codes (K = 256) go to
`lists.IVFIndex` (one float look-up table per query, memory-mapped when loaded), 4-bit
codes (K = 16) to `fastscan.FastScanLists` (faiss's SIMD fast-scan over 8-bit
tables, held in memory; L2 and cosine only).
Its methods are where inputs are checked; the stages below trust them. Metrics:

  "l2"      squared Euclidean distances, smallest first.
  "ip"      inner products <q, x>, largest first: the lists are probed by <q, c_IVF>
            and every shortlist and the final re-rank score <q, reconstruction> (as
            faiss's METRIC_INNER_PRODUCT indexes do). The codec still codes x in L2.
  "cosine"  vectors and queries are normalised to unit length, then searched in L2;
            D holds ||q - x||^2 = 2 - 2 cos(q, x) for the normalised vectors, smallest
            first. A cosine index codes unit vectors, so build its codec (and IVF
            centroids) from normalised training vectors (`train` refuses a codec that
            reconstructs unit vectors no better than half their norm).

A saved index is a directory: `model/` (the codec), `pairwise.npz`, `extra_codes.npy`,
`lists/` (`IVFIndex.save`: the list file, coarse index and arrays) and
`qinco_jax_index.json`, which records the metric, the beam, a fingerprint of the
codec and a checksum of every file (of the list file: its size and its header, which
holds the list sizes; reading all of it would make loading O(N)). `load_index`
verifies them and memory-maps the (8-bit) lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qinco_jax import checkpoint, data
from qinco_jax.codec import load as load_codec
from qinco_jax.pairwise import PairwiseDecoder
from qinco_jax.search import build, decoders, fastscan, legacy, listfile, shards
from qinco_jax.search import coarse as coarse_lib
from qinco_jax.search import lists as lists_lib
from qinco_jax.search.query import Searcher, SearchParams

Metric = Literal["l2", "ip", "cosine"]
META_FILE = "qinco_jax_index.json"
FORMAT = 2  # the lists/ layout; 1: ivf.npz (read, converted)
IVF_FILE = "ivf.npz"  # lists saved before the list file (format 1)
LEGACY_FILE = "index.faiss"  # indexes saved before the per-query-table scan
# Everything a save writes (and earlier formats wrote): a save refuses a target that
# holds anything else rather than delete it.
OURS = {META_FILE, "model", "pairwise.npz", "extra_codes.npy", "lists", "centroids.npy",
        "aq_tables.npy", IVF_FILE, LEGACY_FILE}
COSINE_MAX_REL_MSE = 0.5  # see `_check_cosine_codec`


class Index:
  """A searchable collection of QINCo2-coded vectors (see the module docstring).

  Args:
    codec: an IVF-QINCo2 codec (`QincoConfig(ivf_K=...)`), trained or RQ-initialised,
      with K = 256 or K = 16 (4-bit codes: the fast-scan first stage).
    metric: "l2", "ip" or "cosine" (see the module docstring).
    A, B: encoding beam of `train` and `add` (default: the codec's training A, B).
    coarse: the list search over the codec's IVF centroids: "auto" (exact up to
      4,096 lists, else an HNSW graph), "flat", "hnsw", or a faiss index over them
      (`coarse.build_coarse`, e.g. the search job's). With an HNSW graph, `add`
      takes the encoder's IVF step from it too (its B nearest lists, efSearch
      coarse.ENCODE_EF_SEARCH) instead of scoring every centroid.
    **fit_kw: options of `decoders.fit_decoders` (pairwise decoder).
  """

  def __init__(self, codec, metric: Metric = "l2", *, A: int | None = None,
               B: int | None = None, coarse="auto", **fit_kw):
    if not getattr(codec, "cfg", None) or not codec.cfg.ivf_K:
      raise ValueError("Index needs an IVF-QINCo2 codec (QincoConfig(ivf_K=...) > 0), "
                       f"got {codec!r}")
    if codec.K not in (16, 256):
      raise ValueError(f"Index scans 8-bit codes (K=256) or 4-bit codes (K=16, with "
                       f"faiss's fast-scan), got a codec with K={codec.K}")
    if metric not in ("l2", "ip", "cosine"):
      raise ValueError(f"metric must be 'l2', 'ip' or 'cosine', got {metric!r}")
    if codec.K == 16 and metric == "ip":
      raise ValueError("metric='ip' needs a codec with K=256: 4-bit (K=16) codes are "
                       "scanned by faiss's fast-scan in L2 only (use 'l2', or 'cosine' "
                       "for normalised vectors)")
    codec._check_AB(A, B)
    self.codec, self.metric, self.A, self.B = codec, metric, A, B
    self.coarse, self.fit_kw = coarse, fit_kw
    self.fingerprint: str | None = None  # of the saved files it was loaded from or saved to
    self._dec: decoders.Decoders | None = None
    self._ivf: fastscan.Lists | None = None

  # -------------------------------------------------------------- state
  @property
  def is_trained(self) -> bool:
    return self._ivf is not None

  @property
  def ntotal(self) -> int:
    return 0 if self._ivf is None else self._ivf.ntotal

  @property
  def d(self) -> int:
    return self.codec.d

  def _vectors(self, x, name: str) -> np.ndarray:
    x = data.as_float32(np.asarray(x), d=self.d, name=name)
    if self.metric == "cosine":
      norms = np.linalg.norm(x, axis=1, keepdims=True)
      if (norms == 0).any():
        raise ValueError(f"{name}: row {int(np.flatnonzero(norms == 0)[0])} is all zeros, "
                         "which has no direction (metric='cosine')")
      x = x / norms
    return x

  def _trained(self, what: str) -> tuple[decoders.Decoders, fastscan.Lists]:
    if self._dec is None or self._ivf is None:
      raise RuntimeError(f"{what} needs a trained index: call index.train(x) first")
    return self._dec, self._ivf

  def searcher(self) -> Searcher:
    """The query path behind `search` (`query.Searcher`): its `search` also returns
    the seconds spent per stage, and `sweep.run_sweep` tunes its settings."""
    d, ivf = self._trained("searcher")
    return Searcher(self.codec, ivf, d.centroids, d.pairwise, d.extra)

  # -------------------------------------------------------------- faiss verbs
  def train(self, x, *, codes=None, verbose: bool = False):
    """Fits the AQ and pairwise decoders on (up to 1M of) these vectors, (n, d) raw
    units; `codes` are their codes if already encoded. Replaces an earlier training
    and empties the index."""
    x = self._vectors(x[:self.fit_kw.get("n_aq_train", decoders.N_AQ_TRAIN)],
                      "training vectors")
    if self.metric == "cosine":
      _check_cosine_codec(self.codec, x, self.A, self.B)
    self._dec = decoders.fit_decoders(self.codec, x, A=self.A, B=self.B,
                                      train_codes=codes, verbose=verbose, **self.fit_kw)
    self._ivf = fastscan.empty_lists(self._dec.centroids, self._dec.tables,
                                     self._dec.train_codes,
                                     metric="ip" if self.metric == "ip" else "l2",
                                     coarse=self.coarse)

  def add(self, x, ids=None, *, verbose: bool = False) -> np.ndarray:
    """Encodes (n, d) vectors and stores their codes; ids (n,) integers in 0..2**63-1
    default to one past the largest id stored so far, counting up. Returns the codes
    (n, M + 1). A loaded (memory-mapped) index is read into memory first, O(ntotal)."""
    _, ivf = self._trained("add")
    x = self._vectors(x, "vectors")
    if ids is not None:
      ids = lists_lib.check_ids(ids, len(x))
    codes = self.codec.encode(x, A=self.A, B=self.B, verbose=verbose,
                              **self.encode_kw())
    ivf.add(codes, ids)
    return codes

  def encode_kw(self) -> dict:
    """Extra arguments of `codec.encode` for this index's vectors: the IVF step's
    candidates from an (L2) HNSW list search, when there is one."""
    _, ivf = self._trained("encode")
    if ivf.exact_coarse or ivf.metric != "l2":
      return {}
    k = self.codec.cfg.B if self.B is None else self.B
    return {"ivf_candidates": coarse_lib.candidates(ivf.coarse, max(1, k),
                                                    coarse_lib.ENCODE_EF_SEARCH)}

  def add_codes(self, codes, ids=None):
    """Stores precomputed codes (n, M + 1) (column 0: list id) under ids (n,)."""
    _, ivf = self._trained("add_codes")
    ivf.add(codes, ids)

  def add_shards(self, shard_list, path: str | os.PathLike, *, verbose: bool = False):
    """Adds the codes of shard files (`shards.encode_shard`) and saves the result to
    directory `path`, with memory bounded by one shard (`search.build`); the index
    then searches the saved, memory-mapped lists. The shards' ids are their database
    rows. `shard_list`: [(path, record)] (`shards.find_shards`); each was encoded by
    this index's codec (checked)."""
    _, ivf = self._trained("add_shards")
    fp = shards.codec_fingerprint(self.codec)
    for p, meta in shard_list:
      if meta.get("codec") != fp:
        raise ValueError(f"{str(p)!r} was encoded by another codec (fingerprint "
                         f"{meta.get('codec')}) than this index's ({fp})")
    readers = [(f"{p.name}:{meta.get('codec')}:{meta.get('fingerprint')}:{meta.get('rows')}",
                _shard_chunks(p, meta)) for p, meta in shard_list]
    path = _target(path)
    scratch = path.with_name(f".{path.name}.build")

    def write_lists(tmp: Path):
      build.build_lists(tmp / "lists", ivf, readers, scratch, verbose=verbose,
                        total_rows=sum(int(m["rows"][1]) - int(m["rows"][0])
                                       for _, m in shard_list))
    self._write(path, write_lists)
    self._ivf = fastscan.open_lists(path / "lists")

  def search(self, queries, k: int, *, nprobe: int = 16, ef_search: int = 64,
             nshort: int = 100, nmid_short: int = 4, batch: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """k nearest stored vectors of each query.

    Args:
      queries: (nq, d) raw units.
      k: results per query.
      nprobe, ef_search: inverted lists visited, HNSW efSearch of the coarse quantiser.
      nshort: candidates re-ranked by the full QINCo2 decoding (at least k are).
      nmid_short: the pairwise shortlist is nmid_short * nshort long.
      batch: queries per pass through the stages (default: `Searcher.search`'s, more
        queries per batch for shorter shortlists).
    Returns:
      D (nq, k) float32 squared distances, smallest first (inner products, largest
      first, for "ip"; see the module docstring for "cosine"), and I (nq, k) int64
      ids; -1 (with D = inf, or -inf for "ip") only where the probed lists hold fewer
      than k vectors (a warning says how often).
    """
    self._trained("search")
    q = self._vectors(queries, "queries")
    p = SearchParams(nprobe=nprobe, ef_search=ef_search, nshort=nshort,
                     nmid_short=nmid_short)
    D, I, _ = self.searcher().search(q, k=k, params=p, batch=batch)
    return D, I

  def remove_ids(self, ids, *, path: str | os.PathLike | None = None,
                 verbose: bool = False) -> int:
    """Removes the vectors with these (integer) ids; returns how many were removed.

    Without `path`: in memory, O(ntotal) (a loaded, memory-mapped index is read into
    memory first). With `path`, the offline compaction of an index larger than memory:
    the index without them is saved to directory `path` (as `save`; it may be the
    directory the index was loaded from) by one sequential pass over its list file
    with memory bounded by a block of lists (`search.build.remove_ids`), and the index
    then searches the saved, memory-mapped lists.
    """
    _, ivf = self._trained("remove_ids")
    if path is None:
      return ivf.remove_ids(ids)
    removed = []
    target = _target(path)
    self._write(target, lambda tmp: removed.append(
        build.remove_ids(tmp / "lists", ivf, ids, verbose=verbose)[1]))
    self._ivf = fastscan.open_lists(target / "lists")
    return removed[0]

  # -------------------------------------------------------------- files
  def save(self, path: str | os.PathLike):
    """Writes the index to directory `path` (created). An index directory there is
    replaced as a whole, unless it holds files a save does not write (refused, so
    that nothing of the user's is deleted); any other non-empty directory is refused.
    The files go to a temporary sibling first, so an interrupted save leaves the
    earlier index intact. `load_index` reads it."""
    _, ivf = self._trained("save")
    self._write(_target(path), lambda tmp: ivf.save(tmp / "lists"))

  def _write(self, path: Path, write_lists):
    d, ivf = self._trained("save")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
      tmp.mkdir()
      self.codec.save(tmp / "model")
      np.save(tmp / "extra_codes.npy", d.extra, allow_pickle=False)
      d.pairwise.save(tmp / "pairwise.npz")
      write_lists(tmp)
      meta: dict[str, Any] = {"format": FORMAT, "metric": self.metric, "A": self.A,
                              "B": self.B, "codec": shards.codec_fingerprint(self.codec),
                              "files": _digests(tmp)}
      fingerprint = meta["self"] = _digest_meta(meta)
      (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
      checkpoint.atomic_replace_dir(tmp, path)
      self.fingerprint = fingerprint
    finally:
      if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)

  def __repr__(self) -> str:
    return (f"Index(ntotal={self.ntotal}, metric={self.metric!r}, d={self.d}, "
            f"ivf_K={self.codec.cfg.ivf_K}, M={self.codec.M})")


def _shard_chunks(path: Path, meta: dict):
  s = int(meta.get("rows", [0])[0])

  def chunks():
    for start, codes in shards.iter_shard(path, meta):
      yield codes, np.arange(s + start, s + start + len(codes), dtype=np.int64)
  return chunks


def _check_cosine_codec(codec, x: np.ndarray, A, B):
  """A cosine index codes unit vectors: refuse a codec that reconstructs (up to 1000
  of) the normalised training vectors with a mean squared error above
  COSINE_MAX_REL_MSE of their squared norm (1): one trained on vectors of another
  scale (it would rank by distances up to ~16, where 4 is the most unit vectors can
  be apart)."""
  sample = x[:1000]
  x_hat = codec.decode(codec.encode(sample, A=A, B=B, verbose=False), verbose=False)
  rel = float(((x_hat - sample) ** 2).sum(1).mean())
  if rel > COSINE_MAX_REL_MSE:
    raise ValueError(f"metric='cosine' codes unit vectors, but this codec reconstructs "
                     f"them with a mean squared error of {rel:.3g} (their squared norm is "
                     "1): it was trained on vectors of another scale; create the codec "
                     "(and its IVF centroids) from normalised vectors")


def _target(path: str | os.PathLike) -> Path:
  """Where a save may write: a new path, an empty directory, or an index directory
  holding only what saves write."""
  path = Path(path).absolute()
  if not path.exists():
    return path
  if not path.is_dir() or (any(path.iterdir()) and not (path / META_FILE).exists()):
    raise ValueError(f"cannot save the index to {str(path)!r}: it exists and is "
                     "not a qinco-jax index (nor an empty directory)")
  foreign = sorted(p.name for p in path.iterdir() if p.name not in OURS)
  if foreign:
    raise ValueError(f"cannot save the index to {str(path)!r}: it holds files an index "
                     f"save did not write ({', '.join(foreign[:5])}); move them out "
                     "first (a save replaces the whole directory)")
  return path


def _hash_file(path: Path, limit: int | None = None) -> str:
  h = hashlib.blake2b(digest_size=16)
  with open(path, "rb") as f:
    left = limit
    while left is None or left > 0:
      block = f.read(1 << 22 if left is None else min(1 << 22, left))
      if not block:
        break
      h.update(block)
      if left is not None:
        left -= len(block)
  return h.hexdigest()


def _digests(root: Path) -> dict[str, str]:
  """{relative path: blake2b} of every file a save wrote outside model/ (which has
  its own checksums); of the list file: its size and header."""
  out = {}
  for p in sorted(root.rglob("*")):
    rel = p.relative_to(root).as_posix()
    if not p.is_file() or rel.startswith("model/"):
      continue
    if p.name == lists_lib.LISTS_FILE:
      out[rel] = f"{p.stat().st_size}:{_hash_file(p, listfile.head_size(p))}"
    else:
      out[rel] = _hash_file(p)
  return out


def _digest_meta(meta: dict) -> str:
  body = json.dumps({k: v for k, v in meta.items() if k != "self"}, sort_keys=True)
  return hashlib.blake2b(body.encode(), digest_size=16).hexdigest()


def _verify(path: Path, meta: dict):
  where = f"index {str(path)!r}"
  if meta.get("self") != _digest_meta(meta):
    raise ValueError(f"{where}: {META_FILE} was changed after the save (its checksum "
                     "does not match): restore it, or save the index again")
  want = meta.get("files", {})
  got = {}
  for rel in want:
    p = path / rel
    if not p.is_file():
      raise ValueError(f"{where} is incomplete: {rel} is missing")
    if rel.endswith(lists_lib.LISTS_FILE):
      got[rel] = f"{p.stat().st_size}:{_hash_file(p, listfile.head_size(p))}"
    else:
      got[rel] = _hash_file(p)
  bad = sorted(rel for rel in want if got[rel] != want[rel])
  if bad:
    raise ValueError(f"{where} is corrupt: {', '.join(bad)} do not match the checksums "
                     "saved with them (a damaged or edited file); restore it from a copy "
                     "or save the index again")


def load_index(path: str | os.PathLike, mmap: bool = True) -> Index:
  """Reads an index written by `Index.save` (in any process), checking every file
  against the checksums saved with it. Its 8-bit lists are memory-mapped (mmap=False:
  read into memory), so loading takes O(nlist), not O(ntotal); 4-bit lists are read
  into memory, O(ntotal). Indexes saved by earlier versions (`ivf.npz`, or an
  `index.faiss` file) are converted on reading."""
  path = Path(path)
  meta_path = path / META_FILE
  if not path.exists():  # an interrupted save: restore its newest complete copy
    checkpoint.recover(path, check=lambda c: _verify(
        c, json.loads((c / META_FILE).read_text())), meta_file=META_FILE)
  if not meta_path.exists():
    raise FileNotFoundError(f"no qinco-jax index at {str(path)!r} ({META_FILE} missing)")
  try:
    meta = json.loads(meta_path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"index {str(path)!r}: {META_FILE} cannot be read ({e})") from None
  if meta.get("format", 1) >= FORMAT:
    _verify(path, meta)
  codec = load_codec(path / "model")
  if "codec" in meta and shards.codec_fingerprint(codec) != meta["codec"]:
    raise ValueError(f"index {str(path)!r}: model/ holds another codec than the one this "
                     "index was built with (its fingerprint differs): restore it")
  index = Index(codec, meta["metric"], A=meta.get("A"), B=meta.get("B"))
  try:
    pairwise = PairwiseDecoder.load(path / "pairwise.npz")
    extra = np.load(path / "extra_codes.npy", allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f"index {str(path)!r}: its decoders cannot be read ({e})") from None
  metric: Literal["l2", "ip"] = "ip" if index.metric == "ip" else "l2"
  if (path / "lists").is_dir():
    ivf = fastscan.open_lists(path / "lists", mmap=mmap)
  elif (path / IVF_FILE).exists():
    with np.load(path / IVF_FILE, allow_pickle=False) as arrays:
      ivf = legacy.from_arrays(arrays)
  elif (path / LEGACY_FILE).exists():
    import faiss
    ivf = legacy.from_faiss_ivf_rq(faiss.read_index(str(path / LEGACY_FILE)),
                                   np.load(path / "centroids.npy"),
                                   np.load(path / "aq_tables.npy"), metric)
  else:
    raise FileNotFoundError(f"{str(path)!r} holds no inverted lists (lists/ missing)")
  index._ivf = ivf
  index.fingerprint = str(meta.get("self") or _digest_meta(meta))
  index._dec = decoders.Decoders(ivf.centroids, ivf.tables, pairwise, extra,
                                 np.zeros((0, codec.n_codes), np.int32))
  return index
