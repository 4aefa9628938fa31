"""Beam-search encoding with candidate pre-selection (spec sections 5 and 6).

Everything here is a pure function of a merged `Qinco` module and arrays with static
shapes, meant to run under `jax.jit`. The beam always has B slots: when fewer than B
hypotheses exist (B > K at step 0, say) the extra slots are marked invalid and score
+inf, so one compiled `lax.scan` covers steps 1..M-1 whatever K, A and B are.

Per step, with F = B incoming beams per vector:
  1. pre-selection: keep the A codes per beam whose C'_m[k] best matches the residual
     (A = 0: all K codes are candidates);
  2. evaluate f_m on the candidates with the codeword half of the first layer
     precomputed once per step (spec 16), so a candidate costs one gather, one add,
     the L residual blocks and the output projection;
  3. score ||x - (x_hat + f)||^2 and keep the B best of the B * A candidates
     (the last step keeps beam 0, the best, since `top_k` sorts).
"""

from __future__ import annotations

import collections
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qinco_jax.model import Qinco, StepNet, expand_to_rank

Array = jax.Array

# Incremented at trace time only: tests use it to prove the encoder compiles once.
TRACE_COUNTS: collections.Counter = collections.Counter()


class EncodeResult(NamedTuple):
  codes: Array  # (N, M) int32
  x_hat: Array  # (N, D) float32, normalised space
  target_mean: Array | None  # (M, D) batch mean of each step's target x - x_hat_m
  target_std: Array | None  # (M, D) batch std (unbiased) of the same
  target_count: Array | None = None  # (M,) valid beams the statistics are over


def sq_dists(x: Array, c: Array) -> Array:
  """Squared L2 distances ||x_i - c_k||^2: x (..., D), c (K, D) -> (..., K) float32.

  Uses the ||x||^2 - 2<x, c> + ||c||^2 expansion (one GEMM); the result can be very
  slightly negative, which is harmless for ranking.
  """
  return (jnp.sum(x * x, -1, keepdims=True) - 2.0 * x @ c.T
          + expand_to_rank(jnp.sum(c * c, -1), x.ndim))


def _masked_stats(r: Array, valid: Array) -> tuple[Array, Array, Array]:
  """Per-dimension mean and unbiased std of r (N, F, D) over valid (N, F) rows, and
  the count they are over (at least 2)."""
  w = valid.astype(r.dtype)[..., None]
  cnt = jnp.maximum(jnp.sum(w), 2.0)
  mean = jnp.sum(r * w, axis=(0, 1)) / cnt
  var = jnp.sum(w * (r - mean[None, None, :]) ** 2, axis=(0, 1)) / (cnt - 1.0)
  return mean, jnp.sqrt(var), cnt


def _take(a: Array, idx: Array) -> Array:
  """Batched gather along axis 1: a (N, S, ...), idx (N, T) -> (N, T, ...)."""
  idx = idx.reshape(idx.shape + (1,) * (a.ndim - 2))
  return jnp.take_along_axis(a, idx, axis=1)


def first_step(x: Array, codebook0: Array, B: int) -> tuple[Array, Array, Array]:
  """The plain RQ step 0 with a beam of B slots.

  Args:
    x: (N, D) normalised targets.
    codebook0: (K, D).
    B: beam size.
  Returns:
    codes (N, B) int32, x_hat (N, B, D), valid (N, B) bool.
  """
  K = codebook0.shape[0]
  F = min(B, K)
  neg, idx = jax.lax.top_k(-sq_dists(x, codebook0), F)  # (N, F)
  idx = idx.astype(jnp.int32)
  valid = jnp.ones(idx.shape, bool)
  if F < B:  # more beam slots than codewords: pad with invalid slots
    pad = ((0, 0), (0, B - F))
    idx, valid = jnp.pad(idx, pad), jnp.pad(valid, pad)
  return idx, codebook0[idx], valid


def pre_predict(pre_net: StepNet | None, Cp: Array, x_hat: Array) -> Array:
  """What pre-selection predicts each code adds to a beam (spec 5.1, 5.2): the
  codeword C'[k] itself (Ls = 0), or g(C'[k], x_hat) (Ls > 0). The encoder scores
  every code with it and the training loss fits the chosen code's (spec 9.1).

  Args:
    pre_net: g_m, or None when Ls = 0.
    Cp: (..., K, D) pre-selection codewords (K any number, e.g. all K or the one
      code chosen); broadcast against x_hat's leading dims.
    x_hat: (..., D) beams.
  Returns:
    (..., K, D).
  """
  if pre_net is None:
    return Cp
  beam = pre_net.beam_term(x_hat)[..., None, :]  # (..., 1, E)
  ndim = max(Cp.ndim, beam.ndim)
  return pre_net.tail(expand_to_rank(pre_net.code_table(Cp), ndim)
                      + expand_to_rank(beam, ndim), expand_to_rank(Cp, ndim))


def pre_scores(r: Array, x_hat: Array, Cp: Array, pre_net: StepNet | None) -> Array:
  """Pre-selection scores of every code for each beam: ||r - pre_predict||^2.

  Args:
    r: (N, F, D) residual targets x - x_hat. x_hat: (N, F, D) beams.
    Cp: (K, D) pre-selection codebook C'_m. pre_net: g_m when Ls > 0, else None.
  Returns:
    (N, F, K): ||r - C'[k]||^2 (Ls = 0, by the matmul expansion), or
    ||r - g(C'[k], x_hat)||^2.
  """
  if pre_net is None:
    return sq_dists(r, Cp)
  return jnp.sum((r[:, :, None, :] - pre_predict(pre_net, Cp, x_hat)) ** 2, -1)


def network_step(x: Array, x_hat: Array, valid: Array, C: Array, Cp: Array | None,
                 net: StepNet, pre_net: StepNet | None, A: int, F_out: int):
  """One QINCo2 step of the beam search.

  Args:
    x: (N, D) targets. x_hat: (N, F, D) beams. valid: (N, F) bool.
    C: (K, D) codebook. Cp: (K, D) pre-selection codebook (None when A = 0).
    net: f_m. pre_net: g_m when Ls > 0, else None.
    A: candidates per beam (0 = all K). F_out: beams kept.
  Returns:
    parent (N, F_out) int32 beam each new beam extends, code (N, F_out) int32,
    new x_hat (N, F_out, D), new valid (N, F_out) bool.
  """
  N, F, _ = x_hat.shape
  K = C.shape[0]
  r = x[:, None, :] - x_hat  # (N, F, D) residual targets
  table = net.code_table(C)  # (K, E), once per step
  beam = net.beam_term(x_hat)  # (N, F, E), once per beam
  if A > 0:
    assert Cp is not None  # A > 0 comes with pre-selection codebooks
    _, cand = jax.lax.top_k(-pre_scores(r, x_hat, Cp, pre_net), A)  # (N, F, A)
    cand = cand.astype(jnp.int32)
    h0 = table[cand] + beam[:, :, None, :]  # (N, F, A, E)
    c = C[cand]  # (N, F, A, D)
  else:
    cand = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (N, F, K))
    h0 = table[None, None] + beam[:, :, None, :]  # (N, F, K, E)
    c = jnp.broadcast_to(C, (N, F, K, C.shape[1]))
  f = net.tail(h0, c)  # (N, F, A_eff, D)
  A_eff = f.shape[2]
  dist = jnp.sum((r[:, :, None, :] - f) ** 2, -1)  # (N, F, A_eff)
  dist = jnp.where(valid[:, :, None], dist, jnp.inf).reshape(N, F * A_eff)
  k = min(F_out, F * A_eff)  # fewer candidates than beam slots: pad below
  neg, sel = jax.lax.top_k(-dist, k)  # (N, k), best first
  parent = (sel // A_eff).astype(jnp.int32)
  code = jnp.take_along_axis(cand.reshape(N, F * A_eff), sel, axis=1)
  f_sel = _take(f.reshape(N, F * A_eff, -1), sel)
  new_x_hat = _take(x_hat, parent) + f_sel
  valid = jnp.isfinite(neg)
  if k < F_out:
    pad = ((0, 0), (0, F_out - k))
    parent, code, valid = jnp.pad(parent, pad), jnp.pad(code, pad), jnp.pad(valid, pad)
    new_x_hat = jnp.pad(new_x_hat, pad + ((0, 0),))
  return parent, code, new_x_hat, valid


def _slice(state, m):
  return jax.tree.map(lambda a: a[m], state)


def ivf_assign(x: Array, centroids: Array, candidates: Array | None = None) -> Array:
  """Nearest IVF centroid of each row: x (N, D), centroids (K_IVF, D) -> (N,) int32.

  candidates: optional (N, C) int32 list ids to choose among (from a coarse index, so
  that K_IVF = 2^20 centroids are not all scored per vector; -1 = none); the distances
  are the same expansion as the exhaustive argmin's, so with the true nearest among
  them the result is the exhaustive one.
  """
  if candidates is None:
    return jnp.argmin(sq_dists(x, centroids), axis=1).astype(jnp.int32)
  c = centroids[jnp.maximum(candidates, 0)]  # (N, C, D)
  d = (jnp.sum(x * x, -1, keepdims=True) - 2.0 * jnp.einsum("nd,ncd->nc", x, c)
       + jnp.sum(c * c, -1))
  d = jnp.where(candidates >= 0, d, jnp.inf)
  best = jnp.argmin(d, axis=1)
  return jnp.take_along_axis(candidates, best[:, None], 1)[:, 0].astype(jnp.int32)


def beam_search(model: Qinco, x: Array, *, A: int, B: int,
                with_stats: bool = False, ivf_candidates: Array | None = None
                ) -> EncodeResult:
  """Encodes normalised vectors with beam search.

  Args:
    model: a (merged) Qinco module.
    x: (N, D) float32, normalised space.
    A: candidates per beam (0 = exhaustive over K). Requires pre-selection
      codebooks when A > 0.
    B: beam size (1 = greedy).
    with_stats: also return the per-step mean/std of the targets over valid beams.
    ivf_candidates: (N, C) int32 lists the IVF step chooses among (`ivf_assign`);
      None: all K_IVF centroids.
  Returns:
    EncodeResult with codes (N, M_tot) int32 (with IVF, column 0 is the list id) and
    x_hat (N, D) normalised.
  """
  TRACE_COUNTS["beam_search"] += 1
  cfg = model.cfg
  M_tot, n_net = cfg.M_tot, cfg.n_net
  if A > 0 and model.pre_codebooks is None and n_net > 0:
    raise ValueError("A > 0 needs pre-selection codebooks, but this model was "
                     "built with A = 0; encode with A=0")
  N = x.shape[0]
  stats = []

  def record(x_hat, valid):
    if with_stats:
      stats.append(_masked_stats(x[:, None, :] - x_hat, valid))

  record(jnp.zeros((N, 1, x.shape[1]), x.dtype), jnp.ones((N, 1), bool))
  use_pre = A > 0 and n_net > 0
  if n_net > 0:
    net_def, net_state = nnx.split(model.steps)
    pre_def, pre_state = (nnx.split(model.pre_steps) if model.pre_steps is not None
                          else (None, None))
    Cp_all: Array | None = None
    if use_pre:
      assert model.pre_codebooks is not None  # checked above (A > 0, n_net > 0)
      Cp_all = model.pre_codebooks[...]
    assert model.codebooks is not None  # n_net > 0: the model has network steps
    C_all = model.codebooks[...]

  def step(m, x_hat, valid, A_m):
    net = nnx.merge(net_def, _slice(net_state, m))
    pre_net = (nnx.merge(pre_def, _slice(pre_state, m))
               if (use_pre and pre_def is not None) else None)
    return network_step(x, x_hat, valid, C_all[m], Cp_all[m] if use_pre else None,
                        net, pre_net, A_m, B)

  if cfg.ivf_K:
    # Frozen IVF step: one beam (the nearest centroid); the first network step then
    # keeps A_eff = max(A, B) candidates so that B beams come out (spec 5.1).
    assert model.ivf_centroids is not None  # cfg.ivf_K > 0
    ivf = ivf_assign(x, model.ivf_centroids[...], ivf_candidates)
    x_hat = model.ivf_centroids[...][ivf][:, None, :]  # (N, 1, D)
    valid = jnp.ones((N, 1), bool)
    history = jnp.zeros((N, B, M_tot), jnp.int32).at[:, :, 0].set(ivf[:, None])
    first_net = 1
    if n_net > 0:
      record(x_hat, valid)
      A_first = min(max(A, B), cfg.K) if A > 0 else 0
      _, code, x_hat, valid = step(0, x_hat, valid, A_first)
      history = history.at[:, :, 1].set(code)
    else:
      x_hat = jnp.broadcast_to(x_hat, (N, B, x.shape[1]))
  else:
    assert model.codebook0 is not None  # no IVF: a plain RQ step 0
    codes0, x_hat, valid = first_step(x, model.codebook0[...], B)
    history = jnp.zeros((N, B, M_tot), jnp.int32).at[:, :, 0].set(codes0)
    first_net = 0

  def body(carry, m):
    x_hat, valid, history = carry
    ys = _masked_stats(x[:, None, :] - x_hat, valid) if with_stats else None
    parent, code, x_hat, valid = step(m, x_hat, valid, A)
    history = _take(history, parent)
    history = jax.lax.dynamic_update_slice_in_dim(history, code[:, :, None], m + 1, 2)
    return (x_hat, valid, history), ys

  if n_net > first_net:
    (x_hat, valid, history), ys = jax.lax.scan(
        body, (x_hat, valid, history), jnp.arange(first_net, n_net))
    if with_stats:
      stats.append(ys)
  if not with_stats:
    return EncodeResult(history[:, 0], x_hat[:, 0], None, None)
  means = jnp.concatenate([jnp.atleast_2d(s[0]) for s in stats])
  stds = jnp.concatenate([jnp.atleast_2d(s[1]) for s in stats])
  counts = jnp.concatenate([jnp.atleast_1d(s[2]) for s in stats])
  return EncodeResult(history[:, 0], x_hat[:, 0], means, stds, counts)
