"""Model layout and the step network against the spec's oracles and a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qinco_jax as qj
from qinco_jax.model import Qinco, StepNet, abstract_model, count_params
from tests import reference


@pytest.mark.parametrize("name,expected", [
    ("qinco2-L", 35_588_736), ("qinco1", 7_832_448),
    ("qinco2-M", 10_816_128), ("qinco2-S", 1_639_296)])
def test_param_count_oracles(name, expected):
  # Spec 4.4: BigANN, D=128, K=256, M=8, no IVF.
  assert count_params(abstract_model(qj.preset(name), 128)) == expected


def test_no_preselection_codebooks_when_A_is_zero():
  with_pre = count_params(abstract_model(qj.preset("qinco2-S"), 128))
  without = count_params(abstract_model(qj.preset("qinco2-S", A=0), 128))
  assert with_pre - without == 7 * 256 * 128


def test_f_at_init_is_2c_when_E_equals_D():
  net = StepNet(16, 16, 32, 2, rngs=nnx.Rngs(0))
  c = jax.random.normal(jax.random.key(1), (5, 16))
  x_hat = jax.random.normal(jax.random.key(2), (5, 16))
  np.testing.assert_allclose(net(c, x_hat), 2 * c, rtol=1e-6, atol=1e-6)


def test_f_at_init_with_projections_is_c_plus_linear_map():
  net = StepNet(8, 12, 16, 2, rngs=nnx.Rngs(0))
  c = jax.random.normal(jax.random.key(1), (5, 8))
  x_hat = jax.random.normal(jax.random.key(2), (5, 8))
  P = net.in_proj.kernel[...] @ net.out_proj.kernel[...]
  np.testing.assert_allclose(net(c, x_hat), c + c @ P, rtol=1e-5, atol=1e-5)
  # Kaiming-uniform bounds of spec 4.2.
  assert float(jnp.abs(net.in_proj.kernel[...]).max()) <= np.sqrt(6 / 8)
  assert float(jnp.abs(net.blocks[0].up_proj.kernel[...]).max()) <= np.sqrt(6 / 12)
  assert float(jnp.abs(net.blocks[0].down_proj.kernel[...]).max()) == 0.0


@pytest.mark.parametrize("qinco1_mode,de", [(False, None), (False, 12), (True, None)])
def test_stepnet_matches_numpy_reference(qinco1_mode, de):
  rng = np.random.default_rng(0)
  cfg = qj.QincoConfig(K=8, M=3, L=2, de=de, dh=10, A=4, B=2, qinco1_mode=qinco1_mode)
  codec = qj.Codec.create(cfg, rng.standard_normal((200, 6)).astype(np.float32),
                          verbose=False)
  codec = reference.randomize(codec)
  p = reference.np_params(codec)
  model = codec.model()
  net = nnx.merge(*_slice_steps(model, 1))
  c = rng.standard_normal((4, 6)).astype(np.float32)
  x_hat = rng.standard_normal((4, 6)).astype(np.float32)
  expected = np.stack([reference.np_f(p["steps"][1], ci, xi, qinco1_mode)
                       for ci, xi in zip(c, x_hat)])
  np.testing.assert_allclose(net(c, x_hat), expected, rtol=1e-4, atol=1e-4)
  # The encoder's split form (spec 16) equals the plain composition.
  split = net.tail(net.code_table(c) + net.beam_term(x_hat), c)
  np.testing.assert_allclose(split, expected, rtol=1e-4, atol=1e-4)


def _slice_steps(model, m):
  gd, st = nnx.split(model.steps)
  return gd, jax.tree.map(lambda a: a[m], st)


def test_qinco1_has_no_outer_residual_and_torch_init():
  net = StepNet(16, 16, 32, 1, qinco1_mode=True, rngs=nnx.Rngs(0))
  bound = 1 / np.sqrt(32)
  w = np.asarray(net.concat.kernel[...])
  assert np.abs(w).max() <= bound and np.abs(w).max() > 0.5 * bound
  assert np.abs(np.asarray(net.concat.bias[...])).max() > 0


def test_model_has_no_steps_when_M_is_1():
  m = Qinco(qj.QincoConfig(K=4, M=1, A=0, B=1), 3, rngs=nnx.Rngs(0))
  assert m.steps is None and count_params(m) == 12
