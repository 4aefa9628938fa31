"""faiss baselines behind the codec's verbs: PQ, OPQ, RQ (beam search) and LSQ.

    q = baselines.FaissQuantizer("RQ", d=50, M=8, beam=32)
    q.train(xt)                      # (n, d) float32
    codes = q.encode(x)              # (n, M) int32, one 8-bit code per step
    x_hat = q.decode(codes)          # (n, d) float32
    evaluate.evaluate(q, ds)         # the same evaluation as a QINCo2 codec

Every quantizer has K = 2^nbits codewords per step (256 by default: M bytes per
vector); codes are unpacked to one integer per step. RQ and LSQ are
additive, so their codes are prefix-decodable like QINCo2's (`prefix_decode`: the sum
of the first m codewords); PQ and OPQ are not. PQ and OPQ zero-pad the vectors to a
multiple of M dimensions (OPQ rotates them first).
"""

from __future__ import annotations

from typing import Any, Literal, cast

import numpy as np

from qinco_jax.data import as_float32, check_int_matrix

Kind = Literal["PQ", "OPQ", "RQ", "LSQ"]
KINDS = ("PQ", "OPQ", "RQ", "LSQ")


def unpack_codes(packed: np.ndarray, M: int, nbits: int) -> np.ndarray:
  """faiss's packed codes (n, code_size) uint8 (M fields of nbits, little-endian bit
  order) -> (n, M) int32."""
  bits = np.unpackbits(np.asarray(packed, np.uint8), axis=1, bitorder="little")
  bits = bits[:, :M * nbits].reshape(len(packed), M, nbits).astype(np.int64)
  return (bits << np.arange(nbits)).sum(-1).astype(np.int32)


def pack_codes(codes: np.ndarray, nbits: int, code_size: int) -> np.ndarray:
  """Inverse of `unpack_codes`: (n, M) ints -> (n, code_size) uint8."""
  n, M = codes.shape
  bits = ((np.asarray(codes, np.int64)[..., None] >> np.arange(nbits)) & 1).astype(np.uint8)
  bits = np.pad(bits.reshape(n, M * nbits), ((0, 0), (0, 8 * code_size - M * nbits)))
  return np.packbits(bits, axis=1, bitorder="little")


class FaissQuantizer:
  """A faiss quantizer with M steps of nbits (see the module docstring).

  Args:
    kind: "PQ", "OPQ", "RQ" or "LSQ".
    d: vector dimension.
    M: steps (sub-quantizers), i.e. bytes per vector when nbits = 8.
    nbits: bits per code (K = 2^nbits codewords per step).
    beam: RQ: beam size for training and encoding (1 = greedy).
    refine: RQ: faiss's default training, which ends with a joint codebook refinement;
      False trains greedily step by step (`Train_default`).
    kmeans_iters: RQ: k-means iterations per step (None: faiss's default).
    lsq_iters: LSQ training iterations.
    opq_iters: OPQ rotation iterations.
  """

  def __init__(self, kind: Kind, d: int, M: int, *, nbits: int = 8, beam: int = 1,
               refine: bool = True, kmeans_iters: int | None = None,
               lsq_iters: int = 25, opq_iters: int = 50):
    import faiss

    if kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if d < 1 or M < 1 or beam < 1 or not 1 <= nbits <= 16:
      raise ValueError(f"d, M and beam must be >= 1 and nbits in [1, 16], got d={d}, "
                       f"M={M}, beam={beam}, nbits={nbits}")
    self.kind, self.d, self.M, self.beam, self.nbits = kind, d, M, beam, nbits
    self.K = 1 << nbits
    self.dp = -(-d // M) * M if kind in ("PQ", "OPQ") else d  # padded dimension
    # A faiss.Index (PQ, OPQ) or a faiss.AdditiveQuantizer (RQ, LSQ): the methods below
    # choose their faiss calls by self.kind, which a type checker cannot follow.
    self.faiss: Any
    # "np": no polysemous training (it only renumbers the codewords, for Hamming
    # filtering, and costs seconds even on tiny sets).
    if kind == "PQ":
      self.faiss = faiss.index_factory(self.dp, f"PQ{M}x{nbits}np")
    elif kind == "OPQ":
      self.faiss = faiss.index_factory(self.dp, f"OPQ{M},PQ{M}x{nbits}np")
      # downcast_VectorTransform returns the concrete class (typed as the base class)
      opq = cast(faiss.OPQMatrix, faiss.downcast_VectorTransform(self.faiss.chain.at(0)))
      opq.niter = opq_iters
    elif kind == "RQ":
      self.faiss = faiss.ResidualQuantizer(d, M, nbits)
      self.faiss.max_beam_size = beam
      if not refine:
        self.faiss.train_type = faiss.ResidualQuantizer.Train_default
      if kmeans_iters is not None:
        self.faiss.cp.niter = kmeans_iters
    else:
      self.faiss = faiss.LocalSearchQuantizer(d, M, nbits)
      self.faiss.train_iters = lsq_iters

  @property
  def name(self) -> str:
    return (f"faiss {self.kind} {self.M}x{self.nbits}"
            + (f" beam {self.beam}" if self.kind == "RQ" else ""))

  @property
  def additive(self) -> bool:
    """Whether codes are prefix-decodable (RQ, LSQ)."""
    return self.kind in ("RQ", "LSQ")

  def _vectors(self, x, name: str) -> np.ndarray:
    x = as_float32(np.asarray(x), d=self.d, name=name)
    if self.dp != self.d:
      x = np.pad(x, ((0, 0), (0, self.dp - self.d)))
    return np.ascontiguousarray(x)

  def train(self, x) -> FaissQuantizer:
    """Trains on (n, d) vectors; returns self."""
    self.faiss.train(self._vectors(x, "training vectors"))
    return self

  @property
  def _code_size(self) -> int:
    return (self.faiss.sa_code_size() if self.kind in ("PQ", "OPQ")
            else self.faiss.code_size)

  def encode(self, x) -> np.ndarray:
    """(n, d) vectors -> (n, M) int32 codes in [0, K)."""
    x = self._vectors(x, "vectors")
    packed = (self.faiss.sa_encode(x) if self.kind in ("PQ", "OPQ")
              else self.faiss.compute_codes(x))
    return unpack_codes(packed, self.M, self.nbits)

  def decode(self, codes) -> np.ndarray:
    """(n, M) codes -> (n, d) float32 reconstructions."""
    codes = check_int_matrix(codes, "codes", self.K)
    if codes.shape[1] != self.M:
      raise ValueError(f"codes: expected {self.M} columns, got {codes.shape[1]}")
    packed = pack_codes(codes, self.nbits, self._code_size)
    if self.kind in ("PQ", "OPQ"):
      return self.faiss.sa_decode(packed)[:, :self.d]
    return self.faiss.decode(packed)

  def codebooks(self) -> np.ndarray:
    """(M, K, d) codewords of an additive quantizer (RQ, LSQ)."""
    if not self.additive:
      raise ValueError(f"{self.kind} has no additive codebooks (RQ and LSQ have)")
    import faiss
    return faiss.vector_to_array(self.faiss.codebooks).reshape(self.M, self.K, self.d)

  def prefix_decode(self, codes, m: int) -> np.ndarray:
    """Reconstruction from the first m codes of an additive quantizer: (n, d)."""
    codes = check_int_matrix(codes, "codes", self.K)
    books = self.codebooks()
    out = np.zeros((len(codes), self.d), np.float32)
    for i in range(m):
      out += books[i][codes[:, i]]
    return out
