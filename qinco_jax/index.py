"""faiss IVF index holding precomputed QINCo2 codes (spec 12.1 step 5).

`build_index` creates `IVF{K_IVF}_HNSW32,RQ{M}x8_Nqint8`, fills the HNSW coarse
quantiser with the raw IVF centroids, overwrites the RQ codebooks with the
least-squares AQ tables (no faiss training of the RQ), trains the 8-bit norm quantiser
on ||r_hat||^2 of training reconstructions, and appends the database codes directly to
the inverted lists: faiss never re-encodes anything. Distances it computes are then
||q - c_IVF - sum_m T_m[i_m]||^2 in raw units; with metric="ip" the index is built
for inner products (coarse quantiser and lists score <q, c_IVF + sum_m T_m[i_m]>,
largest first; the stored norms are then unused).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from qinco_jax import aq


def _faiss():
  import faiss
  return faiss


METRICS = {"l2": lambda: _faiss().METRIC_L2, "ip": lambda: _faiss().METRIC_INNER_PRODUCT}


def metric_of(index) -> str:
  """The metric a faiss index was built for: "l2" or "ip"."""
  return "ip" if index.metric_type == _faiss().METRIC_INNER_PRODUCT else "l2"


def ivf_of(index):
  faiss = _faiss()
  return faiss.downcast_index(faiss.extract_index_ivf(index))


def list_id_bytes(ivf_K: int) -> int:
  """Bytes faiss uses for a list number in `search_and_return_codes` (3 for 2^20)."""
  return max(1, ((ivf_K - 1).bit_length() + 7) // 8)


def pack_list_ids(ids: np.ndarray, ivf_K: int) -> np.ndarray:
  """List ids (n,) -> (n, nbytes) uint8 little-endian, as faiss writes them."""
  nb = list_id_bytes(ivf_K)
  ids = np.asarray(ids, np.int64)
  return ((ids[:, None] >> (8 * np.arange(nb))) & 0xFF).astype(np.uint8)


def unpack_list_ids(b: np.ndarray) -> np.ndarray:
  """(..., nbytes) uint8 little-endian -> (...) int64 list ids."""
  b = np.asarray(b, np.int64)
  return (b << (8 * np.arange(b.shape[-1]))).sum(-1)


def build_index(centroids: np.ndarray, tables: np.ndarray, train_codes: np.ndarray,
                db_codes: np.ndarray, db_ids: np.ndarray | None = None,
                ef_construction: int = 20, metric: Literal["l2", "ip"] = "l2"):
  """Builds the searchable faiss index from precomputed codes.

  Args:
    centroids: (K_IVF, D) raw IVF centroids.
    tables: (M, K, D) least-squares AQ tables (raw residual units), K = 256.
    train_codes: (n_t, M + 1) codes of training vectors (to train the norm quantiser).
    db_codes: (n, M + 1) int codes of the database; column 0 = IVF list id.
    db_ids: (n,) int64 database ids (default 0..n-1).
    metric: "l2" (squared distances) or "ip" (inner products).
  Returns:
    the faiss index (ntotal = n).
  """
  faiss = _faiss()
  K_ivf, D = centroids.shape
  M, K, Dt = tables.shape
  if K != 256 or Dt != D:
    raise ValueError(f"tables must be (M, 256, {D}) (8-bit codes), got {tables.shape}")
  for name, c in (("train_codes", train_codes), ("db_codes", db_codes)):
    if c.ndim != 2 or c.shape[1] != M + 1:
      raise ValueError(f"{name} must be (n, {M + 1}) (IVF id + M codes), got {c.shape}")
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {tuple(METRICS)}, got {metric!r}")
  index = faiss.index_factory(D, f"IVF{K_ivf}_HNSW32,RQ{M}x8_Nqint8", METRICS[metric]())
  ivf = ivf_of(index)
  quantizer = faiss.downcast_index(ivf.quantizer)
  quantizer.hnsw.efConstruction = ef_construction
  quantizer.add(np.ascontiguousarray(centroids, np.float32))
  rq = ivf.rq
  faiss.copy_array_to_vector(np.ascontiguousarray(tables, np.float32).ravel(),
                             rq.codebooks)
  rq.is_trained = True
  norms = (aq.aq_decode(tables, train_codes[:, 1:]) ** 2).sum(1).astype(np.float32)
  rq.train_norm(len(norms), faiss.swig_ptr(norms))
  ivf.is_trained = True
  index.is_trained = True
  add_codes(index, tables, db_codes, db_ids)
  return index


def add_codes(index, tables: np.ndarray, codes: np.ndarray,
              ids: np.ndarray | None = None, chunk: int = 1 << 18):
  """Appends precomputed (n, M + 1) codes to the inverted lists (no re-encoding)."""
  faiss = _faiss()
  ivf = ivf_of(index)
  rq = ivf.rq
  n = len(codes)
  ids = np.arange(ivf.ntotal, ivf.ntotal + n, dtype=np.int64) if ids is None else (
      np.asarray(ids, np.int64))
  for s in range(0, n, chunk):
    c = np.asarray(codes[s:s + chunk])
    lists = c[:, 0].astype(np.int64)
    q = np.ascontiguousarray(c[:, 1:], np.int32)
    norms = (aq.aq_decode(tables, q) ** 2).sum(1).astype(np.float32)
    packed = np.zeros((len(c), ivf.code_size), np.uint8)
    rq.pack_codes(len(c), faiss.swig_ptr(q), faiss.swig_ptr(packed), -1,
                  faiss.swig_ptr(norms))
    order = np.argsort(lists, kind="stable")
    bounds = np.searchsorted(lists[order], np.arange(ivf.nlist + 1))
    for l in np.flatnonzero(np.diff(bounds)):
      sel = order[bounds[l]:bounds[l + 1]]
      lid = np.ascontiguousarray(ids[s:s + chunk][sel])
      lc = np.ascontiguousarray(packed[sel])
      ivf.invlists.add_entries(int(l), len(sel), faiss.swig_ptr(lid), faiss.swig_ptr(lc))
  ivf.ntotal += n
  index.ntotal = ivf.ntotal


def stored_codes(index, list_no: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids (n,), M codes (n, M)) stored in one inverted list (for checks)."""
  faiss = _faiss()
  ivf = ivf_of(index)
  inv = ivf.invlists
  n = inv.list_size(list_no)
  ids = faiss.rev_swig_ptr(inv.get_ids(list_no), n).copy()
  raw = faiss.rev_swig_ptr(inv.get_codes(list_no), n * ivf.code_size).copy()
  return ids, raw.reshape(n, ivf.code_size)[:, :ivf.rq.M].astype(np.int32)
