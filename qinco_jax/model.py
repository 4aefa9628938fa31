"""The QINCo2 model as Flax NNX modules (spec sections 4 and 5).

`StepNet` is the step network f_m(c, x_hat); `Qinco` holds every parameter of a model:
the plain step-0 codebook, the stacked codebooks, pre-selection codebooks and step
networks of steps 1..M-1 (stacked along a leading step axis so that the encoder and
decoder can `lax.scan` over steps), the data normalisation and the running target
statistics. Modules are used functionally: `nnx.split` once, then pure jitted functions
of `(graphdef, state, ...)` (see `encode.py`, `decode.py`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from qinco_jax.config import QincoConfig

Array = jax.Array

_he_uniform = jax.nn.initializers.he_uniform()  # U(+-sqrt(6 / fan_in)): Kaiming for ReLU
_torch_uniform = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
_zeros = jax.nn.initializers.zeros


def _torch_bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Stat(nnx.Variable):
  """A stored, never-trained array (data normalisation)."""


def expand_to_rank(v: Array, ndim: int) -> Array:
  """v with leading unit axes added up to rank `ndim`: the explicit spelling of NumPy's
  rank promotion (the library runs under jax_numpy_rank_promotion="raise")."""
  return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def _mm(x: Array, w: Array, dtype) -> Array:
  """x @ w with both operands in `dtype` (the compute dtype), result float32.

  x: (..., I) float32, w: (I, O) float32 -> (..., O) float32. In a reduced dtype the
  gradients are accumulated in float32 as well (`_mixed_mm`)."""
  if dtype == jnp.float32:
    return x @ w
  return _mixed_mm(x.astype(jnp.float32), w.astype(jnp.float32), jnp.dtype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_mm(x: Array, w: Array, dtype) -> Array:
  return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _mixed_mm_fwd(x, w, dtype):
  xc, wc = x.astype(dtype), w.astype(dtype)
  return jnp.matmul(xc, wc, preferred_element_type=jnp.float32), (xc, wc)


def _mixed_mm_bwd(dtype, res, g):
  # Both gradients come out of float32-accumulating matmuls. JAX's own rule returns
  # them in the compute dtype, so that data-parallel training summed the weight
  # gradients of the devices in bfloat16 (the compiler reduces the per-device matmul
  # result before the cast back to float32; seen in the TPU compile).
  xc, wc = res
  gc = g.astype(dtype)
  dx = jnp.matmul(gc, wc.T, preferred_element_type=jnp.float32)
  dw = jnp.einsum("...i,...o->io", xc, gc, preferred_element_type=jnp.float32)
  return dx, dw


_mixed_mm.defvjp(_mixed_mm_fwd, _mixed_mm_bwd)


class ResidualBlock(nnx.Module):
  """h + V relu(U h), no biases (spec 4.2). The matmuls run in `dtype`; the residual
  stream h stays float32."""

  def __init__(self, E: int, H: int, *, qinco1_mode: bool, rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.dtype = jnp.dtype(dtype)
    self.up_proj = nnx.Linear(
        E, H, use_bias=False, rngs=rngs,
        kernel_init=_torch_uniform if qinco1_mode else _he_uniform)
    self.down_proj = nnx.Linear(
        H, E, use_bias=False, rngs=rngs,
        kernel_init=_torch_uniform if qinco1_mode else _zeros)

  def __call__(self, h: Array) -> Array:
    u = jax.nn.relu(_mm(h, self.up_proj.kernel[...], self.dtype))
    return h + _mm(u, self.down_proj.kernel[...], self.dtype)


class StepNet(nnx.Module):
  """The step network f(c, x_hat) of one QINCo2 step (spec 4.2, 4.3).

  All inputs may carry any leading axes (vectors, beams, candidates); Dense layers act
  on the last axis. Shapes: c (..., D) codeword, x_hat (..., D) partial
  reconstruction entering the step; output (..., D) float32.

  The forward pass is split in three parts so that the encoder can precompute the
  codeword-only half once per step (spec 16):
    h0 = code_table(c) + beam_term(x_hat);  f = tail(h0, c).
  `__call__` is the plain composition.
  """

  def __init__(self, d: int, E: int, H: int, L: int, *, qinco1_mode: bool = False,
               rngs: nnx.Rngs, dtype=jnp.float32):
    self.d, self.E, self.H, self.L = d, E, H, L
    self.qinco1_mode = qinco1_mode
    self.dtype = jnp.dtype(dtype)  # compute dtype of the matmuls (spec 9.9)
    w_init = _torch_uniform if qinco1_mode else _he_uniform
    self.in_proj: nnx.Linear | None
    self.out_proj: nnx.Linear | None
    if E != d:
      self.in_proj = nnx.Linear(d, E, use_bias=False, kernel_init=w_init, rngs=rngs)
      self.out_proj = nnx.Linear(E, d, use_bias=False, kernel_init=w_init, rngs=rngs)
    else:
      self.in_proj = None
      self.out_proj = None
    # Concatenation layer on [e ; x_hat] (embedding first), kernel (E + D, E).
    self.concat = nnx.Linear(
        E + d, E, rngs=rngs,
        kernel_init=_torch_uniform if qinco1_mode else _zeros,
        bias_init=_torch_bias_init(E + d) if qinco1_mode else _zeros)
    self.blocks = nnx.List(
        [ResidualBlock(E, H, qinco1_mode=qinco1_mode, rngs=rngs, dtype=dtype)
         for _ in range(L)])

  def embed(self, c: Array) -> Array:
    """e = P_in c: (..., D) -> (..., E)."""
    return c if self.in_proj is None else _mm(c, self.in_proj.kernel[...], self.dtype)

  def code_table(self, c: Array) -> Array:
    """Codeword-only part of h0, e + W_e e: (..., D) -> (..., E)."""
    e = self.embed(c)
    return e + _mm(e, self.concat.kernel[...][: self.E], self.dtype)

  def beam_term(self, x_hat: Array) -> Array:
    """Reconstruction-only part of h0, W_x x_hat + b: (..., D) -> (..., E)."""
    bias = self.concat.bias
    assert bias is not None  # concat is built with a bias
    y = _mm(x_hat, self.concat.kernel[...][self.E:], self.dtype)
    return y + expand_to_rank(bias[...], y.ndim)

  def tail(self, h0: Array, c: Array) -> Array:
    """Residual blocks, output projection and outer residual: -> (..., D)."""
    h = h0
    for block in self.blocks:
      h = block(h)
    out = h if self.out_proj is None else _mm(h, self.out_proj.kernel[...], self.dtype)
    return out if self.qinco1_mode else c + out

  def __call__(self, c: Array, x_hat: Array) -> Array:
    e = self.embed(c)
    c, x_hat = jnp.broadcast_arrays(c, x_hat)
    e = jnp.broadcast_to(e, c.shape[:-1] + e.shape[-1:])
    bias = self.concat.bias
    assert bias is not None  # concat is built with a bias
    h0 = e + _mm(jnp.concatenate([e, x_hat], axis=-1), self.concat.kernel[...],
                 self.dtype) + expand_to_rank(bias[...], e.ndim)
    return self.tail(h0, c)


def _stacked_stepnets(n: int, d: int, E: int, H: int, L: int, qinco1_mode: bool,
                      rngs: nnx.Rngs, dtype=jnp.float32) -> StepNet:
  """n independent StepNets whose parameters are stacked along a leading axis."""
  nets = [StepNet(d, E, H, L, qinco1_mode=qinco1_mode, rngs=rngs, dtype=dtype)
          for _ in range(n)]
  graphdef, _ = nnx.split(nets[0])
  states = [nnx.split(net)[1] for net in nets]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  return nnx.merge(graphdef, stacked)


class Qinco(nnx.Module):
  """All parameters and buffers of a QINCo2 model for D-dimensional data.

  S = cfg.n_net network steps follow step 0 (S = M - 1, or M after an IVF step).

  Attributes (normalised space unless stated):
    codebook0: (K, D) Param, the plain RQ step 0 (None with IVF).
    ivf_centroids: (ivf_K, D) Stat, the frozen IVF step 0 (None without IVF).
    codebooks: (S, K, D) Param, C_m of the network steps (None when S = 0).
    pre_codebooks: (S, K, D) Param, C'_m for pre-selection (None when A = 0).
    steps: StepNet with every parameter stacked along a leading (S) axis.
    pre_steps: stacked pre-selection networks g_m when Ls > 0, else None.
    data_mean: (D,) Stat, raw units.  data_std: () Stat, raw units (one scalar).
    xtarget_mean, xtarget_std: (M_tot, D) BatchStat, running target statistics (9.8).
  """

  def __init__(self, cfg: QincoConfig, d: int, *, rngs: nnx.Rngs):
    if not isinstance(d, int) or d < 1:
      raise ValueError(f"data dimension must be a positive int, got {d!r}")
    self.cfg = cfg
    self.d = d
    K, E = cfg.K, cfg.embed_dim(d)
    self.codebook0: nnx.Param | None
    self.ivf_centroids: Stat | None
    self.codebooks: nnx.Param | None
    self.steps: StepNet | None
    self.pre_codebooks: nnx.Param | None
    self.pre_steps: StepNet | None
    if cfg.ivf_K:
      self.codebook0 = None
      self.ivf_centroids = Stat(jnp.zeros((cfg.ivf_K, d), jnp.float32))
    else:
      self.codebook0 = nnx.Param(jnp.zeros((K, d), jnp.float32))
      self.ivf_centroids = None
    n = cfg.n_net
    if n > 0:
      self.codebooks = nnx.Param(jnp.zeros((n, K, d), jnp.float32))
      self.steps = _stacked_stepnets(n, d, E, cfg.dh, cfg.L, cfg.qinco1_mode, rngs,
                                     cfg.dtype)
    else:
      self.codebooks = None
      self.steps = None
    if n > 0 and cfg.A > 0:
      self.pre_codebooks = nnx.Param(jnp.zeros((n, K, d), jnp.float32))
      self.pre_steps = (
          _stacked_stepnets(n, d, E, cfg.dh_pre, cfg.Ls, cfg.qinco1_mode, rngs, cfg.dtype)
          if cfg.Ls > 0 else None)
    else:
      self.pre_codebooks = None
      self.pre_steps = None
    self.data_mean = Stat(jnp.zeros((d,), jnp.float32))
    self.data_std = Stat(jnp.ones((), jnp.float32))
    self.xtarget_mean = nnx.BatchStat(jnp.zeros((cfg.M_tot, d), jnp.float32))
    self.xtarget_std = nnx.BatchStat(jnp.ones((cfg.M_tot, d), jnp.float32))

  @property
  def first_table(self) -> Array:
    """Step 0's table: the IVF centroids or the plain codebook, (K0, D)."""
    table = self.ivf_centroids if self.codebook0 is None else self.codebook0
    assert table is not None  # a model has exactly one of them
    return table[...]


def count_params(model_or_state) -> int:
  """Number of trainable parameters (nnx.Param leaves), pre-selection codebooks included."""
  state = model_or_state
  if isinstance(model_or_state, nnx.Module):
    state = nnx.state(model_or_state, nnx.Param)
  else:
    state = state.filter(nnx.Param)
  return int(sum(x.size for x in jax.tree.leaves(state)))


def abstract_model(cfg: QincoConfig, d: int) -> Qinco:
  """A Qinco whose arrays are ShapeDtypeStructs (no memory, no compute)."""
  return nnx.eval_shape(lambda: Qinco(cfg, d, rngs=nnx.Rngs(0)))
