"""`Codec`: the user-facing compressor (create, encode, decode, save, load).

A Codec is a config, a data dimension and the `nnx.State` of a `Qinco` model, split
once; the compiled paths are pure jitted functions of `(graphdef, state, chunk)`.
Inputs of any length (NumPy arrays or memory-mapped files) are streamed in fixed-size
chunks, the last one padded, so each (A, B, chunk) compiles exactly once. With several
local devices each chunk is split across them (data parallel).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from qinco_jax import checkpoint, data, rq_init
from qinco_jax.config import Dtype, QincoConfig
from qinco_jax.decode import decode_steps, denormalize, normalize
from qinco_jax.encode import beam_search
from qinco_jax.model import Qinco, abstract_model, count_params
from qinco_jax.packing import pack_fields, packed_size, unpack_fields

DECODE_CHUNK = 8192
DECODE_BUCKET = 1024  # the last chunk of a decode is padded to a multiple of this
CPU_ENC_ROWS = 8192  # encoder candidate rows per call on CPU (cache-friendly; see chunk_size)
N_INIT = 1_000_000  # training vectors used by the RQ initialisation (spec 8.1)


@functools.partial(jax.jit, static_argnames=("graphdef", "A", "B"))
def encode_chunk(graphdef, state, x, A: int, B: int):
  """One compiled encoder call (what `Codec.encode` runs per chunk): x (chunk, d)
  float32 raw -> (codes (chunk, M_tot) int32, x_hat (chunk, d) float32 raw)."""
  model = nnx.merge(graphdef, state)
  res = beam_search(model, normalize(model, x), A=A, B=B)
  return res.codes, denormalize(model, res.x_hat)


@functools.partial(jax.jit, static_argnames=("graphdef", "A", "B"))
def _encode_chunk_candidates(graphdef, state, x, candidates, A: int, B: int):
  model = nnx.merge(graphdef, state)
  res = beam_search(model, normalize(model, x), A=A, B=B, ivf_candidates=candidates)
  return res.codes, denormalize(model, res.x_hat)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def decode_chunk(graphdef, state, codes):
  """One compiled decoder call (what `Codec.decode` runs per chunk): codes (chunk, m)
  int32 -> (chunk, d) float32 raw."""
  model = nnx.merge(graphdef, state)
  return denormalize(model, decode_steps(model, codes)[0])


def local_mesh(devices=None) -> jax.sharding.Mesh:
  """The mesh encode and decode split their chunks over: this process's devices on one
  ("data",) axis (each process of a multi-host job encodes its own rows). devices:
  default `jax.local_devices()` (the ahead-of-time compile passes a target host's)."""
  return jax.sharding.Mesh(np.array(jax.local_devices() if devices is None else devices),
                           ("data",))


class Codec:
  """A QINCo2 vector codec.

  Typical use::

    cfg = qj.preset("qinco2-S", M=16)
    codec = qj.Codec.create(cfg, train_x)      # RQ-initialised, networks at init
    codes = codec.encode(x, A=32, B=64)        # (n, M) uint8 (K <= 256)
    x_hat = codec.decode(codes)                # (n, d) float32, raw units
    codec.save("model_dir"); codec = qj.load("model_dir")

  Attributes:
    cfg: the QincoConfig (A and B are the training/default encoding values).
    d: data dimension.
    graphdef, state: the split `Qinco` module (state holds parameters and buffers).
    info: free-form metadata saved with the codec (e.g. RQ initialisation MSEs).
  """

  def __init__(self, cfg: QincoConfig, d: int, state: nnx.State,
               info: dict[str, Any] | None = None):
    self.cfg = cfg
    self.d = int(d)
    self.graphdef = nnx.graphdef(abstract_model(cfg, self.d))
    self.state = state
    self.info = dict(info or {})
    self._placed = None  # (mesh, source state, its copy replicated on local devices)

  # ----------------------------------------------------------------- creation
  @classmethod
  def create(cls, cfg: QincoConfig, train_x, seed: int = 0, verbose: bool = True,
             ivf_centroids=None) -> Codec:
    """Builds an untrained codec from training vectors.

    Normalisation statistics come from the first 100k vectors (spec 3.1), codebooks
    from a greedy RQ on the first 1M (spec 8.1) plus relative noise
    `cfg.codebook_noise_init`; the step networks are at their initialisation (4.2):
    with `cfg.init == "rq"` (the QINCo2 default) every step network starts as
    f(c, x_hat) = c, so the new codec decodes exactly like that RQ (P_out = 0 when
    E != D; codewords stored halved when E = D); with "reference", as in the paper's
    code, f = c + P_out P_in c.

    The RQ initialisation costs about 2 M * 10 * n * K * d flops (n <= 1M rows):
    linear in K, so K=65536 takes 256x as long as K=256 (hours on a small CPU);
    `verbose` shows its progress per K-means iteration.

    Args:
      cfg: model configuration.
      train_x: (n, d) training vectors (any real dtype, memmap fine), n >= K.
      seed: seeds the K-means, the codebook noise and the network initialisation.
      ivf_centroids: (ivf_K, d) raw-unit IVF centroids, required when cfg.ivf_K > 0
        (see `qinco_jax.ivf.train_centroids`); frozen, stored normalised. The RQ
        initialisation then starts from the residuals to the nearest centroid.
    """
    if not isinstance(cfg, QincoConfig):
      raise ValueError(f"cfg must be a QincoConfig, got {type(cfg).__name__}")
    if not hasattr(train_x, "shape"):  # a list of vectors, say
      train_x = np.asarray(train_x)
    x = data.as_float32(train_x[:N_INIT], name="train_x")
    n, d = x.shape
    if n < cfg.K:
      raise ValueError(f"need at least K={cfg.K} training vectors, got {n}")
    mean, std = data.data_stats(train_x)
    z = (x - mean) / np.float32(std)
    model = Qinco(cfg, d, rngs=nnx.Rngs(seed))
    if cfg.ivf_K:
      cents = _check_centroids(ivf_centroids, cfg.ivf_K, d)
      cents = (cents - mean) / np.float32(std)
      ids, _ = rq_init.assign(z, cents)  # JAX, as the encoder's IVF step (no faiss)
      z = z - cents[ids]
      assert model.ivf_centroids is not None  # cfg.ivf_K > 0
      model.ivf_centroids[...] = jnp.asarray(cents, jnp.float32)
    elif ivf_centroids is not None:
      raise ValueError("ivf_centroids given but cfg.ivf_K = 0; set ivf_K to their count")
    codebooks, mses = rq_init.train_rq(z, cfg.K, cfg.M, seed=seed, verbose=verbose)
    rng = np.random.default_rng(seed)
    noisy = [c + cfg.codebook_noise_init * c.std() * rng.standard_normal(c.shape)
             for c in codebooks]
    if not cfg.ivf_K:
      assert model.codebook0 is not None  # no IVF: a plain RQ step 0
      model.codebook0[...] = jnp.asarray(noisy.pop(0), jnp.float32)
    if noisy:
      scale = cfg.codeword_scale(d)
      assert model.codebooks is not None  # one codebook per network step: n_net > 0
      model.codebooks[...] = jnp.asarray(np.stack(noisy) * scale, jnp.float32)
      if model.pre_codebooks is not None:
        # Without a network (Ls = 0), C'_m is compared with residuals directly.
        pre_scale = scale if model.pre_steps is not None else 1.0
        model.pre_codebooks[...] = jnp.asarray(np.stack(noisy) * pre_scale, jnp.float32)
      if cfg.init == "rq":
        for net in (model.steps, model.pre_steps):
          if net is not None and net.out_proj is not None:
            net.out_proj.kernel[...] = jnp.zeros_like(net.out_proj.kernel[...])
    model.data_mean[...] = jnp.asarray(mean, jnp.float32)
    model.data_std[...] = jnp.asarray(std, jnp.float32)
    info = {"rq_init_train_mse": [float(m) * float(std) ** 2 for m in mses]}
    return cls(cfg, d, nnx.state(model), info)

  # ------------------------------------------------------------- properties
  @property
  def K(self) -> int:
    return self.cfg.K

  @property
  def M(self) -> int:
    return self.cfg.M

  @property
  def n_codes(self) -> int:
    """Code columns: M, plus one (the IVF list id, column 0) with an IVF step."""
    return self.cfg.M_tot

  @property
  def num_params(self) -> int:
    """Trainable parameters, pre-selection codebooks included."""
    return count_params(self.state)

  @property
  def code_dtype(self) -> np.dtype:
    if self.cfg.ivf_K:
      return np.dtype(np.int32)  # column 0 holds list ids up to ivf_K
    return np.dtype(np.uint8 if self.K <= 256 else np.uint16)

  def model(self) -> Qinco:
    """A live `Qinco` module sharing this codec's arrays."""
    return nnx.merge(self.graphdef, self.state)

  def replace_state(self, state: nnx.State) -> Codec:
    """A codec with the same config and new arrays (e.g. after training)."""
    return Codec(self.cfg, self.d, state, self.info)

  def with_dtype(self, dtype: Dtype | None) -> Codec:
    """This codec computing its step networks' matmuls in `dtype` ("float32" or
    "bfloat16"); the same arrays (parameters stay float32)."""
    if dtype is None or dtype == self.cfg.dtype:
      return self
    variants = self.__dict__.setdefault("_dtype_variants", {})
    if dtype not in variants or variants[dtype].state is not self.state:
      variants[dtype] = Codec(self.cfg.replace(dtype=dtype), self.d, self.state, self.info)
    return variants[dtype]

  def _device_state(self):
    if self._placed is None or self._placed[1] is not self.state:
      mesh = local_mesh()
      placed = jax.device_put(self.state, NamedSharding(mesh, P()))
      self._placed = (mesh, self.state, placed)
    return self._placed[0], self._placed[2]

  # ---------------------------------------------------------------- encode
  def chunk_size(self, A: int, B: int, *, platform: str | None = None,
                 devices: int | None = None) -> int:
    """Vectors per encoder call: each device scores at most enc_max_bs candidates,
    chunk / devices * B * (A or K) <= enc_max_bs (spec 6.3, per device).

    On CPU the budget is further capped at CPU_ENC_ROWS candidate rows: smaller calls
    keep the block activations in cache and encode 1.2-1.3x faster (docs/benchmarks.md,
    codec section) with identical codes.

    platform, devices: the backend and the number of local devices the chunk is split
    over (default: this process's; the ahead-of-time compile passes a target's).
    """
    per_vector = B * (A if A > 0 else self.K)
    rows = self.cfg.enc_max_bs
    if (platform or jax.default_backend()) == "cpu":
      rows = min(rows, CPU_ENC_ROWS)
    ndev = jax.local_device_count() if devices is None else devices
    return max(1, rows // per_vector) * ndev

  def _check_AB(self, A: int | None, B: int | None) -> tuple[int, int]:
    A = self.cfg.A if A is None else A
    B = self.cfg.B if B is None else B
    for name, v in (("A", A), ("B", B)):
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
        raise ValueError(f"{name} must be an int, got {v!r}")
    if not 0 <= A <= self.K:
      raise ValueError(f"A (candidates per beam) must be in [0, K={self.K}], got {A}")
    if A > 0 and self.cfg.A == 0 and self.cfg.n_net > 0:
      raise ValueError(f"this model was trained with A=0 (no pre-selection codebooks),"
                       f" so it cannot encode with A={A}; use A=0")
    if not 1 <= B <= 65536:
      raise ValueError(f"B (beam size) must be in [1, 65536], got {B}")
    return int(A), int(B)

  def encode(self, x, A: int | None = None, B: int | None = None, *,
             chunk_size: int | None = None, verbose: bool = True,
             return_x_hat: bool = False, dtype: Dtype | None = None,
             ivf_candidates: Callable[[np.ndarray], np.ndarray] | None = None):
    """Encodes vectors with beam search.

    Args:
      x: (n, d) vectors in raw units (NumPy array or memmap, any real dtype).
      A: candidates per beam (0 = exhaustive over K); default cfg.A.
      B: beam size (1 = greedy); default cfg.B.
      chunk_size: vectors per compiled call, >= 1 (default `chunk_size(A, B)`, from
        cfg.enc_max_bs, capped on CPU).
      verbose: show a progress bar on long inputs.
      return_x_hat: also return the encoder's reconstruction (n, d) float32.
      dtype: compute dtype of the step networks for this call ("float32",
        "bfloat16"; default cfg.dtype). Scores, top-k and outputs stay float32.
      ivf_candidates: with an IVF step, a function of a chunk of raw vectors (n, d)
        float32 returning (n, C) list ids (-1: none), e.g. a coarse index's search:
        the IVF step then scores only those instead of every centroid (the codes are
        the exhaustive step's whenever the nearest centroid is among them).
    Returns:
      codes (n, M) uint8 when K <= 256 else uint16; with an IVF step (n, M + 1)
      int32 whose column 0 is the IVF list id (and x_hat if requested).
    """
    if dtype not in (None, self.cfg.dtype):
      return self.with_dtype(dtype).encode(x, A, B, chunk_size=chunk_size,
                                           verbose=verbose, return_x_hat=return_x_hat,
                                           ivf_candidates=ivf_candidates)
    if ivf_candidates is not None and not self.cfg.ivf_K:
      raise ValueError("ivf_candidates needs a codec with an IVF step (cfg.ivf_K > 0)")
    A, B = self._check_AB(A, B)
    n = self._check_vectors(x)
    chunk = self.chunk_size(A, B) if chunk_size is None else _check_chunk(chunk_size)
    codes = np.empty((n, self.n_codes), self.code_dtype)
    x_hat = np.empty((n, self.d), np.float32) if return_x_hat else None
    mesh, state = self._device_state()
    sharding = NamedSharding(mesh, P("data"))
    chunk = -(-chunk // mesh.size) * mesh.size

    def collect(item):
      s, e, (c, xh) = item
      codes[s:e] = np.asarray(c)[: e - s]
      if x_hat is not None:
        x_hat[s:e] = np.asarray(xh)[: e - s]

    pending = None
    for s in tqdm(range(0, n, chunk), desc="encode", unit="chunk", leave=False,
                  disable=not verbose or n <= 16 * chunk):
      e = min(s + chunk, n)
      xc = data.as_float32(x[s:e], d=self.d, name="x", row_offset=s)
      if ivf_candidates is None:
        out = encode_chunk(self.graphdef, state, jax.device_put(_pad(xc, chunk), sharding),
                           A=A, B=B)
      else:
        cand = self._candidates(ivf_candidates, xc, s)
        out = _encode_chunk_candidates(self.graphdef, state,
                                       jax.device_put(_pad(xc, chunk), sharding),
                                       jax.device_put(_pad(cand, chunk), sharding), A=A, B=B)
      if pending is not None:
        collect(pending)  # overlaps host work with the chunk just dispatched
      pending = (s, e, out)
    if pending is not None:
      collect(pending)
    return (codes, x_hat) if return_x_hat else codes

  def _candidates(self, fn, xc: np.ndarray, start: int) -> np.ndarray:
    """(n, C) int32 candidate lists of the chunk of rows start.., checked (-1 or
    0..ivf_K-1, at least one per row)."""
    cand = np.asarray(fn(xc))
    if cand.ndim != 2 or len(cand) != len(xc) or cand.dtype.kind not in "iu":
      raise ValueError(f"ivf_candidates must return ({len(xc)}, C) integer list ids, got "
                       f"shape {cand.shape} dtype {cand.dtype}")
    if cand.size and (cand.min() < -1 or cand.max() >= self.cfg.ivf_K):
      raise ValueError(f"ivf_candidates returned list ids {cand.min()}..{cand.max()}, "
                       f"outside -1..{self.cfg.ivf_K - 1}")
    none = np.flatnonzero((cand < 0).all(1)) if cand.size else np.arange(len(cand))
    if len(none):
      raise ValueError(f"ivf_candidates found no list for row {start + none[0]} (and "
                       f"{len(none) - 1} more of rows {start}..{start + len(xc) - 1}): "
                       "widen its search (efSearch)")
    return cand.astype(np.int32)

  # ------------------------------------------------- faiss-style byte codes
  def _field_bits(self) -> list[int]:
    """Bits of each code column in `sa_encode`'s layout (`pack_fields`): the IVF list
    id in as few whole bytes as ivf_K needs, then M codes of 4 bits (K <= 16), 8 bits
    (K <= 256) or 16 bits."""
    ivf = [8 * max(1, ((self.cfg.ivf_K - 1).bit_length() + 7) // 8)] if self.cfg.ivf_K else []
    return ivf + [4 if self.K <= 16 else 8 if self.K <= 256 else 16] * self.M

  @property
  def code_size(self) -> int:
    """Bytes per vector of `sa_encode`: the IVF list id (if any) in as few bytes as
    ivf_K needs, then the M codes: two per byte (K <= 16, low nibble first), one byte
    (K <= 256) or two bytes, little-endian."""
    return packed_size(self._field_bits())

  def pack_codes(self, codes) -> np.ndarray:
    """(n, n_codes) integer codes -> (n, code_size) uint8 (the `sa_encode` layout)."""
    codes = self._check_codes(codes)
    if codes.shape[1] != self.n_codes:
      raise ValueError(f"pack_codes needs all {self.n_codes} code columns, got "
                       f"{codes.shape[1]}")
    return pack_fields(codes, self._field_bits())

  def unpack_codes(self, b) -> np.ndarray:
    """(n, code_size) uint8 -> (n, n_codes) codes, as `encode` returns them."""
    b = np.asarray(b)
    if b.ndim != 2 or b.dtype != np.uint8 or b.shape[1] != self.code_size:
      raise ValueError(f"expected (n, {self.code_size}) uint8 codes (sa_encode), got "
                       f"shape {b.shape} dtype {b.dtype}")
    return unpack_fields(b, self._field_bits()).astype(self.code_dtype)

  def sa_encode(self, x, A: int | None = None, B: int | None = None, **kw) -> np.ndarray:
    """Like faiss's standalone codecs: (n, d) vectors -> (n, code_size) uint8."""
    return self.pack_codes(self.encode(x, A=A, B=B, **kw))

  def sa_decode(self, b, **kw) -> np.ndarray:
    """(n, code_size) uint8 from `sa_encode` -> (n, d) float32 reconstructions."""
    return self.decode(self.unpack_codes(b), **kw)

  # ---------------------------------------------------------------- decode
  def decode(self, codes, *, chunk_size: int = DECODE_CHUNK,
             verbose: bool = True, dtype: Dtype | None = None) -> np.ndarray:
    """Decodes codes to raw-unit vectors.

    Args:
      codes: (n, m) integer codes, 1 <= m <= M; m < M decodes the first m steps
        (dynamic rate).
      chunk_size: codes per compiled call, >= 1.
      dtype: compute dtype of the step networks for this call (see `encode`).
    Returns:
      (n, d) float32.
    """
    if dtype not in (None, self.cfg.dtype):
      return self.with_dtype(dtype).decode(codes, chunk_size=chunk_size, verbose=verbose)
    codes = self._check_codes(codes)
    chunk_size = _check_chunk(chunk_size)
    n, m = codes.shape
    out = np.empty((n, self.d), np.float32)
    mesh, state = self._device_state()
    sharding = NamedSharding(mesh, P("data"))
    chunk = -(-chunk_size // mesh.size) * mesh.size
    # A short last chunk is padded to a multiple of DECODE_BUCKET rows only (a few
    # compiled shapes), not to a whole chunk: search decodes small shortlists.
    bucket = DECODE_BUCKET * mesh.size
    for s in tqdm(range(0, n, chunk), desc="decode", unit="chunk", leave=False,
                  disable=not verbose or n <= 16 * chunk):
      e = min(s + chunk, n)
      cc = _pad(np.asarray(codes[s:e], np.int32), min(chunk, -(-(e - s) // bucket) * bucket))
      out[s:e] = np.asarray(
          decode_chunk(self.graphdef, state, jax.device_put(cc, sharding)))[: e - s]
    return out

  # ------------------------------------------------------------ validation
  def _check_vectors(self, x) -> int:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 2:
      raise ValueError(f"x must be a 2-D (n, {self.d}) array, got "
                       f"{'shape ' + str(shape) if shape is not None else type(x).__name__}")
    if shape[1] != self.d:
      raise ValueError(f"expected vectors of dimension {self.d}, got {shape[1]}")
    return int(shape[0])

  def _check_codes(self, codes) -> np.ndarray:
    codes = data.check_int_matrix(codes, "codes")
    if not 1 <= codes.shape[1] <= self.n_codes:
      raise ValueError(f"codes must have between 1 and {self.n_codes} columns "
                       f"(M={self.M}{' + IVF' if self.cfg.ivf_K else ''}), got "
                       f"{codes.shape[1]}")
    n_ivf = self.cfg.n_ivf
    if n_ivf:
      data.check_int_matrix(codes[:, :n_ivf], "IVF ids (column 0)", self.cfg.ivf_K)
    data.check_int_matrix(codes[:, n_ivf:], "codes", self.K)
    return codes

  # ------------------------------------------------------------------ I/O
  def save(self, path: str | os.PathLike):
    """Saves to an Orbax checkpoint directory, atomically.

    An existing codec checkpoint (or empty directory) at `path` is replaced; any other
    existing directory, or a codec checkpoint holding files a save did not write, is
    refused with a ValueError and left untouched. A symbolic link is saved through
    (its target is replaced); saves at one path wait for each other.
    """
    checkpoint.save_state(path, self.state, {
        "d": self.d, "config": self.cfg.to_dict(), "info": self.info})

  def __repr__(self) -> str:
    c = self.cfg
    return (f"Codec(d={self.d}, K={c.K}, M={c.M}, L={c.L}, de={c.de}, dh={c.dh}, "
            f"A={c.A}, B={c.B}, params={self.num_params:,})")


def check_state_values(state: nnx.State, where: str):
  """Raises ValueError when an array of a codec state is not finite or data_std is not
  positive (such a codec would decode to NaN or divide by zero), naming the cause."""
  for key, a in checkpoint._flat(nnx.to_pure_dict(state)).items():
    a = np.asarray(a)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
      raise ValueError(f"{where}: array {key!r} holds NaN or inf values")
  std = float(np.asarray(state["data_std"][...]))
  if not std > 0:
    raise ValueError(f"{where}: data_std must be > 0 (the normalisation scale), got {std:g}")


def _check_centroids(c, ivf_K: int, d: int) -> np.ndarray:
  if c is None:
    raise ValueError(f"cfg.ivf_K={ivf_K} needs ivf_centroids of shape ({ivf_K}, {d})")
  c = data.as_float32(np.asarray(c), d=d, name="ivf_centroids")
  if c.shape[0] != ivf_K:
    raise ValueError(f"expected {ivf_K} IVF centroids (cfg.ivf_K), got {c.shape[0]}")
  return c


def _check_chunk(chunk_size) -> int:
  """chunk_size as a positive int, or a ValueError naming it."""
  if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) \
      or chunk_size < 1:
    raise ValueError(f"chunk_size (vectors per compiled call) must be an int >= 1, got "
                     f"{chunk_size!r}")
  return int(chunk_size)


def _pad(a: np.ndarray, rows: int) -> np.ndarray:
  if len(a) == rows:
    return a
  out = np.zeros((rows,) + a.shape[1:], a.dtype)
  out[: len(a)] = a
  return out


def load(path: str | os.PathLike) -> Codec:
  """Loads a codec saved with `Codec.save` (or the best codec of a training workdir).

  Raises FileNotFoundError for a missing path and ValueError for a directory that is
  not a qinco-jax codec or whose arrays do not match its own config.
  """
  if os.path.isdir(path) and not os.path.exists(os.path.join(path, checkpoint.META_FILE)):
    best = os.path.join(path, "best")
    # A training workdir: its best codec (restored first if a save of it was cut short).
    if os.path.isdir(best) or checkpoint.recover(best):
      path = best
  meta = checkpoint.read_meta(path)
  try:
    cfg = QincoConfig.from_dict(meta["config"])
    d = int(meta["d"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"checkpoint {str(path)!r} has invalid metadata: {e}") from None
  abstract = nnx.state(abstract_model(cfg, d))
  state = checkpoint.load_state(path, abstract, meta.get("checksums"))
  check_state_values(state, f"checkpoint {str(path)!r}")
  return Codec(cfg, d, state, meta.get("info"))
