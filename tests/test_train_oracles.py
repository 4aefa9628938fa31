"""Training against independent references: the loss and its gradient (spec 9.1), the
running target statistics (9.8), the dead-codeword reset (9.7) and the optimiser
(9.2, 9.3), each against float64 NumPy or hand computation (tests/reference.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qinco_jax as qj
from qinco_jax import train
from tests import reference

D = 5


def _codec(ivf=False, seed=0, **kw):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((400, D)) * 2).astype(np.float32)
  cfg = qj.QincoConfig(**{**dict(K=4, M=3, L=1, de=3, dh=4, A=2, B=2,
                                 ivf_K=4 if ivf else 0), **kw})
  codec = qj.Codec.create(cfg, x, verbose=False, ivf_centroids=x[:4] if ivf else None)
  return reference.randomize(codec, scale=0.3, seed=seed)


# Parameters checked by finite differences: (path in the JAX grads, getter in the NumPy
# parameters); `k` is replaced by a code the batch uses at that step.
def _coordinates(p, codes, ivf):
  first = 1 if ivf else 0
  out = []
  if not ivf:
    out.append((("codebook0", int(codes[0, 0]), 1), lambda q: (q["C0"], (int(codes[0, 0]), 1))))
  for m in range(len(p["steps"])):
    k = int(codes[0, m + 1])
    out += [
        (("codebooks", m, k, 2), lambda q, m=m, k=k: (q["steps"][m]["C"], (k, 2))),
        (("pre_codebooks", m, k, 0), lambda q, m=m, k=k: (q["steps"][m]["Cp"], (k, 0))),
        (("steps", "concat", "kernel", m, 4, 1),
         lambda q, m=m: (q["steps"][m]["Wc"], (4, 1))),
        (("steps", "concat", "bias", m, 2), lambda q, m=m: (q["steps"][m]["bc"], (2,))),
        (("steps", "in_proj", "kernel", m, 3, 0),
         lambda q, m=m: (q["steps"][m]["Pin"], (3, 0))),
        (("steps", "out_proj", "kernel", m, 1, 4),
         lambda q, m=m: (q["steps"][m]["Pout"], (1, 4))),
        (("steps", "blocks", 0, "up_proj", "kernel", m, 2, 3),
         lambda q, m=m: (q["steps"][m]["blocks"][0][0], (2, 3))),
        (("steps", "blocks", 0, "down_proj", "kernel", m, 1, 2),
         lambda q, m=m: (q["steps"][m]["blocks"][0][1], (1, 2)))]
  del first
  return out


def _get(tree, path):
  for i, key in enumerate(path):
    if isinstance(tree, np.ndarray) or hasattr(tree, "shape"):
      return np.asarray(tree)[tuple(path[i:])]
    tree = tree[key]
  return np.asarray(tree)


@pytest.mark.parametrize("ivf,Ls", [(False, 0), (True, 0), (False, 1)],
                         ids=["plain", "ivf", "pre-selection-network"])
def test_loss_and_gradient_match_numpy(ivf, Ls):
  codec = _codec(ivf=ivf, Ls=Ls, dh_pre=3)
  rng = np.random.default_rng(1)
  p = reference.np_params(codec)
  z = rng.standard_normal((12, D))  # a batch in normalised space
  params, rest = jax.tree.map(jnp.asarray, codec.state).split(nnx.Param, ...)
  (loss, aux), grads = jax.value_and_grad(train.loss_fn, has_aux=True)(
      params, rest, codec.graphdef, jnp.asarray(z, jnp.float32), 2, 2)
  codes = np.asarray(aux[0])
  # The codes come from the beam search (no gradient): the NumPy one agrees.
  np.testing.assert_array_equal(codes, [reference.np_beam(p, zi, 2, 2)[0] for zi in z])
  want = reference.np_loss(p, z, codes)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  # Per-step losses: the reconstruction term of the last step is the reported MSE.
  last = np.array([reference.np_decode(p, c) for c in codes])
  assert float(aux[3][-1]) == pytest.approx(((last - z) ** 2).mean(), rel=1e-5)
  # Gradient by central differences of the NumPy loss, codes fixed (the beam search
  # is under stop_gradient) and x_hat_m fixed inside the pre-selection term (sg).
  entering = np.array([reference.np_partials(p, c) for c in codes])
  g = nnx.to_pure_dict(grads)
  h = 1e-6
  for path, where in _coordinates(p, codes, ivf):
    arr, idx = where(p)
    old = arr[idx]
    arr[idx] = old + h
    up = reference.np_loss(p, z, codes, entering)
    arr[idx] = old - h
    down = reference.np_loss(p, z, codes, entering)
    arr[idx] = old
    fd = (up - down) / (2 * h)
    got = float(_get(g, path))
    assert got == pytest.approx(fd, rel=2e-3, abs=2e-5), (path, got, fd)


def test_running_statistics_follow_a_numpy_replay():
  """After 3 updates the EMA buffers (momentum 0.1) equal a NumPy replay of the mean
  and unbiased std of every step's targets x - x_hat_m over all entering beams; each
  update reports its batch's loss and last-step MSE, and counts itself and its codes."""
  codec = _codec(de=None, K=4, M=3, A=2, B=3, seed=2)
  rng = np.random.default_rng(3)
  tx = train.make_optimizer(train.TrainConfig(lr=1e-2), steps_per_epoch=10)
  state = train.init_state(codec.graphdef, codec.state, tx)
  step = train.make_train_step(codec.graphdef, tx, 2, 3)
  M_tot = codec.cfg.M_tot
  mean_ref, std_ref = np.zeros((M_tot, D)), np.ones((M_tot, D))
  for _ in range(3):
    p = reference.np_params(codec.replace_state(nnx.merge_state(
        *jax.tree.map(np.asarray, (state.params, state.rest)))))
    x = (rng.standard_normal((16, D)) * 2).astype(np.float32)
    z = (x.astype(np.float64) - p["mean"]) / p["std"]
    traces = [reference.np_beam_trace(p, zi, 2, 3) for zi in z]
    for m in range(M_tot):
      r = np.array([zi - xh for zi, tr in zip(z, traces) for xh in tr[m]])
      mean_ref[m] = 0.9 * mean_ref[m] + 0.1 * r.mean(0)
      std_ref[m] = 0.9 * std_ref[m] + 0.1 * r.std(0, ddof=1)
    state, metrics = step(state, jnp.asarray(x))
    codes = np.array([reference.np_beam(p, zi, 2, 3)[0] for zi in z])
    last = np.array([reference.np_decode(p, c) for c in codes])
    assert float(metrics["loss"]) == pytest.approx(reference.np_loss(p, z, codes), rel=1e-4)
    assert float(metrics["mse"]) == pytest.approx(((last - z) ** 2).mean(), rel=1e-4)
  assert int(state.step) == 3 and int(np.asarray(state.usage).sum()) == 3 * 16 * codec.M
  np.testing.assert_allclose(np.asarray(state.rest["xtarget_mean"][...]), mean_ref,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(state.rest["xtarget_std"][...]), std_ref,
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("code_scale", [1.0, 0.5])
def test_dead_code_reset_draws_rows_at_the_target_statistics(code_scale):
  """Spec 9.7: a dead row becomes uniform noise standardised over the whole table and
  mapped to the step's running target mean and std; C' gets that row plus Gaussian
  noise of 0.025 x the table's std (noise 0.1); used rows and other steps stay."""
  K, M = 256, 3
  cfg = qj.QincoConfig(K=K, M=M, L=1, de=None, dh=4, A=4, B=2)
  rng = np.random.default_rng(5)
  codec = qj.Codec.create(cfg, rng.standard_normal((2000, D)).astype(np.float32),
                          verbose=False)
  tx = train.make_optimizer(train.TrainConfig(), 10)
  state = train.init_state(codec.graphdef, codec.state, tx)
  mu = np.arange(M * D, dtype=np.float32).reshape(M, D) - 3.0
  sigma = 0.5 + 0.1 * np.arange(M * D, dtype=np.float32).reshape(M, D)
  rest = state.rest
  rest["xtarget_mean"][...] = jnp.asarray(mu)
  rest["xtarget_std"][...] = jnp.asarray(sigma)
  usage = np.ones((M, K), np.int32)
  usage[0, :50] = 0  # step 0 (plain RQ): the first 50 rows dead
  usage[1] = 0  # step 1: every row dead
  usage[2, :100] = 0  # step 2: the first 100 rows dead
  state = state._replace(rest=rest, usage=jnp.asarray(usage))
  before = jax.tree.map(np.asarray, state.params)
  new, n_reset = train.reset_dead_codes(state, jax.random.key(0), 0.1,
                                        code_scale=code_scale)
  np.testing.assert_array_equal(n_reset, [50, K, 100])
  after = jax.tree.map(np.asarray, new.params)
  C0_b, C0_a = before["codebook0"][...], after["codebook0"][...]
  np.testing.assert_array_equal(C0_a[50:], C0_b[50:])
  u0 = (C0_a[:50] - mu[0]) / sigma[0]  # 250 of the table's standardised draws
  assert abs(u0.mean()) < 0.3 and 0.8 < u0.std() < 1.2 and np.abs(u0).max() < 1.05 * 3 ** .5
  C1 = after["codebooks"][...][0] / code_scale  # the drawn rows, as they decode
  u = (C1 - mu[1]) / sigma[1]  # standardised over the table: mean 0, std 1 exactly
  assert abs(u.mean()) < 1e-5 and abs(u.std() - 1) < 1e-4
  # uniform, not Gaussian: bounded near sqrt(3) (sample mean and std shift it a little)
  assert np.abs(u).max() < 1.05 * np.sqrt(3) and u.max() > 1.6 and u.min() < -1.6
  per_dim = (C1.mean(0) - mu[1]) / sigma[1]  # each dimension at its own statistics
  assert np.abs(per_dim).max() < 4 / np.sqrt(K)
  e = (after["pre_codebooks"][...][0] - C1) / (C1.std() * 0.1 / 4)
  assert abs(e.mean()) < 0.15 and abs(e.std() - 1) < 0.1  # N(0, 1) noise on C'
  C2_b, C2_a = before["codebooks"][...][1], after["codebooks"][...][1]
  np.testing.assert_array_equal(C2_a[100:], C2_b[100:])  # used rows untouched
  assert (C2_a[:100] != C2_b[:100]).all(axis=1).all()
  np.testing.assert_array_equal(after["pre_codebooks"][...][1][100:],
                                before["pre_codebooks"][...][1][100:])
  assert np.asarray(new.usage).sum() == 0


def _hand_adam(params, grads, lr, wd, clip, steps):
  """Element-wise clip, then AdamW (b1 0.9, b2 0.999, eps 1e-8, decoupled decay)."""
  p = params.copy()
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  for t, g in enumerate(grads, 1):
    g = np.clip(g, -clip, clip) if clip else g
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    mh, vh = m / (1 - 0.9 ** t), v / (1 - 0.999 ** t)
    p = p - lr * (mh / (np.sqrt(vh) + 1e-8) + wd * p)
  return p


@pytest.mark.parametrize("recipe", ["qinco2", "qinco1"])
def test_optimizer_clips_elementwise_and_decays_weights(recipe):
  tc = (train.train_preset("qinco1") if recipe == "qinco1" else train.TrainConfig())
  tc = tc.replace(lr=0.05, time_budget_s=60.0) if recipe == "qinco2" else tc
  tx = train.make_optimizer(tc, steps_per_epoch=10)
  p0 = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
  grads = [np.array([0.5, -0.3, 0.05, 0.0], np.float32),
           np.array([-0.02, 0.2, -0.5, 0.01], np.float32)]
  params = {"w": jnp.asarray(p0)}
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
    params = {"w": params["w"] + updates["w"]}
  if recipe == "qinco2":  # clip 0.1, AdamW with weight decay 0.1, constant lr here
    want = _hand_adam(p0.astype(np.float64), grads, 0.05, 0.1, 0.1, 2)
  else:  # qinco1: Adam lr 1e-4, no clip, no decay
    want = _hand_adam(p0.astype(np.float64), grads, 1e-4, 0.0, None, 2)
  np.testing.assert_allclose(np.asarray(params["w"]), want, rtol=1e-6, atol=1e-7)
