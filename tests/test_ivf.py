"""IVF step (spec 4.1, 5.1): frozen centroids as step 0, M + 1 code columns."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qinco_jax as qj
from qinco_jax import ivf, train
from tests import reference

D = 5


def _ivf_codec(A=2, B=3, M=3, ivf_K=6, seed=0):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((800, D)) * 2 + 1).astype(np.float32)
  cents = ivf.train_centroids(x, ivf_K, niter=10, seed=seed)
  cfg = qj.QincoConfig(K=8, M=M, L=1, de=7, dh=8, A=A, B=B, ivf_K=ivf_K)
  codec = qj.Codec.create(cfg, x, ivf_centroids=cents, verbose=False)
  return reference.randomize(codec, seed=seed), x, cents, rng


def test_ivf_centroids_are_frozen_and_not_counted():
  codec, _, cents, _ = _ivf_codec()
  m = codec.model()
  np.testing.assert_allclose(np.asarray(m.ivf_centroids[...]) * float(m.data_std[...])
                             + np.asarray(m.data_mean[...]), cents, rtol=1e-5, atol=1e-5)
  no_ivf = qj.QincoConfig(K=8, M=3, L=1, de=7, dh=8, A=2, B=3)
  plain = qj.Codec.create(no_ivf, np.random.default_rng(0).standard_normal(
      (100, D)).astype(np.float32), verbose=False)
  # With IVF all M steps have a network: one more network step, no plain codebook.
  per_net_step = (plain.num_params - 8 * D) // 2
  assert codec.num_params == 3 * per_net_step


# (2, 12): B > K, so the first network step, from the one IVF beam, cannot fill the beam.
@pytest.mark.parametrize("A,B", [(1, 3), (0, 2), (4, 1), (2, 12)])
def test_ivf_beam_search_matches_reference(A, B):
  """The IVF step, then the first network step pre-selecting max(A, B) candidates
  (A = 1 < B: not A, nor all K), against the NumPy beam search."""
  codec, _, _, rng = _ivf_codec()
  x = (rng.standard_normal((40, D)) * 2 + 1).astype(np.float32)
  p, z = reference.normalised(codec, x)
  ref = np.array([reference.np_beam(p, zi, A, B)[0] for zi in z])
  codes = codec.encode(x, A=A, B=B, verbose=False)
  assert codes.shape == (40, 4) and codes.dtype == np.int32
  np.testing.assert_array_equal(codes[:, 0], reference.nearest(x, codec_centroids_raw(codec)))
  reference.assert_same_codes(p, z, codes, ref)
  np.testing.assert_allclose(
      codec.decode(codes, verbose=False),
      np.stack([reference.np_decode(p, c) for c in codes]) * p["std"] + p["mean"],
      rtol=1e-4, atol=1e-4)


def test_ivf_with_a_single_network_step_matches_reference():
  codec, _, _, rng = _ivf_codec(M=1)
  x = (rng.standard_normal((40, D)) * 2 + 1).astype(np.float32)
  p, z = reference.normalised(codec, x)
  codes = codec.encode(x, A=2, B=3, verbose=False)
  assert codes.shape == (40, 2)
  reference.assert_same_codes(p, z, codes, [reference.np_beam(p, zi, 2, 3)[0] for zi in z])


def codec_centroids_raw(codec):
  m = codec.model()
  return np.asarray(m.ivf_centroids[...]) * float(m.data_std[...]) + np.asarray(
      m.data_mean[...])


def test_ivf_bad_inputs():
  codec, x, cents, _ = _ivf_codec()
  with pytest.raises(ValueError, match="IVF ids"):
    codec.decode(np.full((2, 4), 6), verbose=False)
  with pytest.raises(ValueError, match="needs ivf_centroids"):
    qj.Codec.create(codec.cfg, x, verbose=False)
  with pytest.raises(ValueError, match="expected 6 IVF centroids"):
    qj.Codec.create(codec.cfg, x, ivf_centroids=cents[:5], verbose=False)


def test_ivf_training_step_lowers_loss_and_skips_ivf_usage():
  codec, x, _, _ = _ivf_codec(A=2, B=2)
  tx = train.make_optimizer(train.TrainConfig(lr=3e-3, warmup_epochs=0), 10)
  state = train.init_state(codec.graphdef, codec.state, tx)
  step = train.make_train_step(codec.graphdef, tx, 2, 2)
  losses = []
  for _ in range(8):
    state, m = step(state, jnp.asarray(x[:256]))
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0]
  assert state.usage.shape == (3, 8) and int(state.usage.sum()) == 8 * 256 * 3
  state, n_reset = train.reset_dead_codes(state, jax.random.key(0), 0.1)
  assert n_reset.shape == (3,)


def test_ivf_codec_is_created_without_faiss(monkeypatch):
  """A host without faiss (e.g. a GPU training machine) can create an IVF codec: the
  initial list assignment (rq_init.assign, JAX) equals a float64 NumPy argmin."""
  from qinco_jax import rq_init

  rng = np.random.default_rng(0)
  x = rng.standard_normal((3000, 16)).astype(np.float32)
  c = rng.standard_normal((64, 16)).astype(np.float32)
  brute = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1).argmin(1)
  monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss fails
  np.testing.assert_array_equal(rq_init.assign(x, c)[0], brute)
  cfg = qj.QincoConfig(K=8, M=2, L=1, de=None, dh=8, A=2, B=2, ivf_K=64)
  codec = qj.Codec.create(cfg, x, ivf_centroids=c, verbose=False)
  assert codec.encode(x[:10], verbose=False).shape == (10, 3)
