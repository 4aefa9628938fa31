"""The JAX beam search against the slow NumPy reference encoders (tests/reference.py)."""

import jax
import numpy as np
import pytest

import qinco_jax as qj
from tests import reference

D = 5


def _codec(K=4, M=3, A=2, B=3, L=2, de=None, seed=0, qinco1_mode=False):
  rng = np.random.default_rng(seed)
  cfg = qj.QincoConfig(K=K, M=M, L=L, de=de, dh=8, A=A, B=B, qinco1_mode=qinco1_mode)
  train = rng.standard_normal((400, D)).astype(np.float32) * 2 + 0.5
  codec = qj.Codec.create(cfg, train, seed=seed, verbose=False)
  return reference.randomize(codec, seed=seed), rng


def test_greedy_B1_A0_equals_stepwise_greedy():
  codec, rng = _codec(K=6, M=4, A=0, B=1)
  x = rng.standard_normal((60, D)).astype(np.float32) * 2
  p, z = reference.normalised(codec, x)
  ref = np.array([reference.np_greedy(p, zi)[0] for zi in z])
  ours = codec.encode(x, A=0, B=1, verbose=False)
  reference.assert_same_codes(p, z, ours, ref)


def test_full_beam_finds_exhaustive_optimum():
  K, M = 4, 3
  codec, rng = _codec(K=K, M=M, A=0, B=1)
  x = rng.standard_normal((40, D)).astype(np.float32) * 2
  p, z = reference.normalised(codec, x)
  ref = np.array([reference.np_exhaustive(p, zi)[0] for zi in z])
  ours = codec.encode(x, A=0, B=K ** (M - 1), verbose=False)
  reference.assert_same_codes(p, z, ours, ref)
  # ... and greedy is strictly worse on some vectors (the test can tell them apart).
  greedy = codec.encode(x, A=0, B=1, verbose=False)
  assert (reference.code_errors(p, z, greedy) > reference.code_errors(p, z, ref) + 1e-6).any()


@pytest.mark.parametrize("A,B", [(2, 3), (3, 1), (1, 5), (4, 8)])
def test_beam_with_preselection_matches_reference(A, B):
  codec, rng = _codec(K=6, M=4, A=3, B=3, de=7)
  x = rng.standard_normal((40, D)).astype(np.float32) * 2
  p, z = reference.normalised(codec, x)
  ref = np.array([reference.np_beam(p, zi, A, B)[0] for zi in z])
  ours = codec.encode(x, A=A, B=B, verbose=False)
  reference.assert_same_codes(p, z, ours, ref)


def test_a_single_network_step_preselects_like_the_reference():
  """M = 2: the plain RQ step, then one network step, whose pre-selection applies."""
  codec, rng = _codec(K=6, M=2, A=2, B=3, de=7)
  x = rng.standard_normal((40, D)).astype(np.float32) * 2
  p, z = reference.normalised(codec, x)
  ref = np.array([reference.np_beam(p, zi, 2, 3)[0] for zi in z])
  reference.assert_same_codes(p, z, codec.encode(x, A=2, B=3, verbose=False), ref)
  full = np.array([reference.np_beam(p, zi, 0, 3)[0] for zi in z])
  assert (full != ref).any()  # pre-selection changes codes here (the test can tell)


def test_a_codec_without_network_steps_encodes_with_any_A():
  """M = 1: the plain RQ step alone has no network step and so no pre-selection
  codebooks; A > 0 (the config's or one given) leaves nothing to pre-select, and the B
  beams end in each vector's nearest codeword."""
  codec, rng = _codec(K=6, M=1, A=2, B=3)
  x = rng.standard_normal((30, D)).astype(np.float32) * 2
  p, z = reference.normalised(codec, x)
  ref = np.array([reference.np_greedy(p, zi)[0] for zi in z])
  for A in (None, 2, 0):
    kw = {} if A is None else {"A": A}
    reference.assert_same_codes(p, z, codec.encode(x, verbose=False, **kw), ref)


@pytest.mark.parametrize("ivf_K", [0, 3])
def test_target_statistics_over_three_vectors_match_numpy(ivf_K):
  """The per-step target statistics the training's running statistics follow: mean
  and unbiased std of x - x_hat_m over the beams entering step m, and their count, on
  3 vectors (greedy, so 3 beams: the count is floored at 2 only against dividing by
  0), against NumPy over the reference's beams; with IVF, step 1's beams enter at
  the centroids."""
  import jax.numpy as jnp

  from qinco_jax import ivf
  from qinco_jax.encode import beam_search
  rng = np.random.default_rng(0)
  train = rng.standard_normal((400, D)).astype(np.float32) * 2 + 0.5
  cents = ivf.train_centroids(train, ivf_K, niter=5, seed=0) if ivf_K else None
  cfg = qj.QincoConfig(K=4, M=3, L=1, dh=8, A=2, B=1, ivf_K=ivf_K)
  codec = reference.randomize(qj.Codec.create(cfg, train, ivf_centroids=cents,
                                              verbose=False))
  x = rng.standard_normal((3, D)).astype(np.float32) * 2
  p, z = reference.normalised(codec, x)
  res = jax.jit(lambda m, x: beam_search(m, x, A=2, B=1, with_stats=True))(
      codec.model(), jnp.asarray(z, jnp.float32))
  traces = [reference.np_beam_trace(p, zi, 2, 1) for zi in z]
  assert len(res.target_mean) == len(traces[0]) == codec.cfg.M_tot
  for m in range(codec.cfg.M_tot):
    r = np.array([zi - xh for zi, tr in zip(z, traces) for xh in tr[m]])
    assert float(res.target_count[m]) == len(r) == 3
    np.testing.assert_allclose(res.target_mean[m], r.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res.target_std[m], r.std(0, ddof=1), rtol=1e-4, atol=1e-5)


def test_A_equal_K_equals_no_preselection():
  codec, rng = _codec(K=6, M=4, A=3, B=3)
  x = rng.standard_normal((50, D)).astype(np.float32) * 2
  p, z = reference.normalised(codec, x)
  full = codec.encode(x, A=6, B=4, verbose=False)
  none = codec.encode(x, A=0, B=4, verbose=False)
  reference.assert_same_codes(p, z, full, none, min_exact=0.98)


def test_qinco1_mode_greedy_matches_reference():
  codec, rng = _codec(K=5, M=3, A=0, B=1, qinco1_mode=True)
  x = rng.standard_normal((30, D)).astype(np.float32)
  p, z = reference.normalised(codec, x)
  ref = np.array([reference.np_greedy(p, zi)[0] for zi in z])
  reference.assert_same_codes(p, z, codec.encode(x, verbose=False), ref)


def test_larger_beam_is_never_worse_on_average():
  codec, rng = _codec(K=8, M=4, A=3, B=2)
  x = rng.standard_normal((300, D)).astype(np.float32) * 2
  mses = []
  for B in (1, 2, 4, 8, 16):
    _, x_hat = codec.encode(x, A=3, B=B, verbose=False, return_x_hat=True)
    mses.append(qj.metrics.mse(x, x_hat))
  assert all(b <= a * (1 + 1e-6) for a, b in zip(mses, mses[1:])), mses
  assert mses[-1] < mses[0]


def test_encoder_reconstruction_matches_reference_decode():
  codec, rng = _codec(K=6, M=4, A=3, B=3, de=7)
  x = rng.standard_normal((20, D)).astype(np.float32)
  p, _ = reference.normalised(codec, x)
  codes, x_hat = codec.encode(x, verbose=False, return_x_hat=True)
  ref = np.stack([reference.np_decode(p, c) for c in codes]) * p["std"] + p["mean"]
  np.testing.assert_allclose(x_hat, ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(codec.decode(codes, verbose=False), ref, rtol=1e-4, atol=1e-4)


def test_preselection_network_Ls_option():
  """Ls > 0 (spec 5.2): g_m scores all K codes; with A = K the result equals A = 0."""
  rng = np.random.default_rng(3)
  cfg = qj.QincoConfig(K=6, M=3, L=1, de=None, dh=8, A=2, B=2, Ls=1, dh_pre=4)
  codec = qj.Codec.create(cfg, rng.standard_normal((300, D)).astype(np.float32),
                          verbose=False)
  codec = reference.randomize(codec, seed=3)
  assert codec.model().pre_steps is not None
  x = rng.standard_normal((40, D)).astype(np.float32)
  p, z = reference.normalised(codec, x)
  reference.assert_same_codes(p, z, codec.encode(x, A=6, B=3, verbose=False),
                     codec.encode(x, A=0, B=3, verbose=False), min_exact=0.98)
  # With A < K: the candidates g_m picks, ||x - x_hat - g(C'[k], x_hat)||^2 scored in
  # NumPy (spec 5.2), give the same codes; plain C' scoring would give others.
  got = codec.encode(x, A=2, B=2, verbose=False)
  reference.assert_same_codes(p, z, got, np.array([reference.np_beam(p, zi, 2, 2)[0] for zi in z]),
                     min_exact=0.98)
  plain = {**p, "steps": [{**st, "g": None} for st in p["steps"]]}
  assert not np.array_equal(got, [reference.np_beam(plain, zi, 2, 2)[0] for zi in z])


def test_preselection_network_scores_match_numpy():
  """The encoder's pre-selection scores with a network g (spec 5.2), for one step and
  several beams, against NumPy; they depend on the reconstruction x_hat."""
  import jax.numpy as jnp
  from flax import nnx

  from qinco_jax import encode as enc
  rng = np.random.default_rng(4)
  cfg = qj.QincoConfig(K=6, M=2, L=1, de=3, dh=8, A=2, B=2, Ls=2, dh_pre=4)
  codec = reference.randomize(qj.Codec.create(
      cfg, rng.standard_normal((300, D)).astype(np.float32), verbose=False), seed=5)
  p = reference.np_params(codec)
  m = codec.model()
  g_def, g_state = nnx.split(m.pre_steps)
  pre_net = nnx.merge(g_def, jax.tree.map(lambda a: a[0], g_state))
  x = rng.standard_normal((5, D)).astype(np.float32)
  x_hat = rng.standard_normal((5, 3, D)).astype(np.float32)
  got = np.asarray(enc.pre_scores(jnp.asarray(x[:, None] - x_hat), jnp.asarray(x_hat),
                                  m.pre_codebooks[...][0], pre_net))
  want = np.array([[reference.np_pre_scores(p["steps"][0], x[n].astype(np.float64),
                                            x_hat[n, b].astype(np.float64), False)
                    for b in range(3)] for n in range(5)])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert np.ptp(want, axis=1).max() > 1e-2  # the scores depend on x_hat
