"""Sequential decoding (spec section 7): x_hat_{m+1} = x_hat_m + f_m(C_m[i_m], x_hat_m).

Pure functions of a merged `Qinco` module; differentiable (the training loss decodes
beam-search codes with gradients). Decoding the first m < M columns gives the
lower-rate reconstruction of dynamic rate (spec 7.2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qinco_jax.model import Qinco, expand_to_rank

Array = jax.Array


def decode_steps(model: Qinco, codes: Array) -> tuple[Array, Array]:
  """Decodes codes into every partial reconstruction, in normalised space.

  Args:
    model: a merged Qinco module.
    codes: (N, m) int, 1 <= m <= M_tot; column j is the code of step j (with IVF,
      column 0 is the IVF list id).
  Returns:
    x_hat (N, D) float32, the reconstruction after m steps, and partials
    (m, N, D) float32, the reconstruction after each step 1..m.
  """
  m = codes.shape[1]
  codes = codes.astype(jnp.int32)
  x_hat = model.first_table[codes[:, 0]]  # (N, D)
  if m == 1:
    return x_hat, x_hat[None]
  assert model.codebooks is not None  # m > 1 codes: the model has network steps
  net_def, net_state = nnx.split(model.steps)
  head = jax.tree.map(lambda a: a[: m - 1], (net_state, model.codebooks[...]))

  def body(x_hat, inputs):
    state, C, idx = inputs
    net = nnx.merge(net_def, state)
    # f(C[i], x_hat) with the codeword-only half of the first layer computed once per
    # codeword (K rows) instead of once per vector (spec 16; same function).
    h0 = net.code_table(C)[idx] + net.beam_term(x_hat)
    x_hat = x_hat + net.tail(h0, C[idx])
    return x_hat, x_hat

  x_hat_last, partials = jax.lax.scan(body, x_hat, (*head, codes[:, 1:].T))
  return x_hat_last, jnp.concatenate([x_hat[None], partials])


def normalize(model: Qinco, x: Array) -> Array:
  """Raw (N, D) -> normalised: (x - data_mean) / data_std."""
  return (x - expand_to_rank(model.data_mean[...], x.ndim)) / model.data_std[...]


def denormalize(model: Qinco, z: Array) -> Array:
  """Normalised (..., D) -> raw: data_std * z + data_mean."""
  return z * model.data_std[...] + expand_to_rank(model.data_mean[...], z.ndim)
