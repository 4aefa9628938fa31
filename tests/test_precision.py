"""Reduced precision (bfloat16 matmuls in the step networks, spec 9.9) and gradient
accumulation, against float32 and against one large batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qinco_jax as qj
from qinco_jax import train, trainer
from qinco_jax.decode import decode_steps, normalize
from qinco_jax.encode import beam_search


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  ds = qj.data.load_synthetic(n_train=4000, n_db=2000, n_queries=10, d=16, n_val=500)
  cfg = qj.QincoConfig(K=64, M=4, L=2, de=16, dh=32, A=4, B=4)
  tc = train.TrainConfig(lr=4e-3, epochs=3, warmup_epochs=0.5,
                         batch_per_device=256)
  codec = trainer.train_and_evaluate(cfg, tc, ds, tmp_path_factory.mktemp("p") / "f32",
                                     verbose=False)
  return ds, cfg, tc, codec


def test_bfloat16_encoding_is_within_1_percent_of_float32(trained):
  ds, _, _, codec = trained
  x = np.asarray(ds.db)
  c32 = codec.encode(x, A=4, B=8, verbose=False)
  c16 = codec.encode(x, A=4, B=8, verbose=False, dtype="bfloat16")
  mse32 = qj.metrics.mse(x, codec.decode(c32, verbose=False))
  mse16 = qj.metrics.mse(x, codec.decode(c16, verbose=False, dtype="bfloat16"))
  same = (c32 == c16).all(axis=1).mean()
  assert abs(mse16 / mse32 - 1) < 0.01, (mse16, mse32)
  assert same >= 0.95, same
  assert codec.decode(c16, verbose=False, dtype="bfloat16").dtype == np.float32


def test_bfloat16_runs_the_matmuls_in_bfloat16(trained):
  """The dtype must reach the step networks' dot products (and only them)."""
  _, _, _, codec = trained
  m16 = codec.with_dtype("bfloat16").model()
  g, st = nnx.split(m16.steps)
  net = nnx.merge(g, jax.tree.map(lambda a: a[0], st))
  c = jnp.ones((3, 16), jnp.float32)

  def dot_operand_dtypes(f):
    return [{str(v.aval.dtype) for v in e.invars}
            for e in _eqns(jax.make_jaxpr(f)(c).jaxpr) if e.primitive.name == "dot_general"]

  dots = dot_operand_dtypes(lambda c: net(c, c))
  # E = D here: the concat layer and 2 blocks x (up, down), all in bfloat16
  assert len(dots) == 5 and all(d == {"bfloat16"} for d in dots), dots
  assert net(c, c).dtype == jnp.float32  # outputs (and the residual stream) float32
  m32 = codec.model()
  g, st = nnx.split(m32.steps)
  net32 = nnx.merge(g, jax.tree.map(lambda a: a[0], st))
  assert all(d == {"float32"} for d in dot_operand_dtypes(lambda c: net32(c, c)))


def _eqns(jaxpr):
  """Every equation of a jaxpr, those of its sub-jaxprs (custom_vjp, scan, ...) too."""
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def test_bfloat16_weight_gradients_are_accumulated_in_float32():
  """A data-parallel step sums the devices' weight gradients as the matmul produced
  them: they must come out of the matmul in float32 (the TPU compile showed JAX's own
  rule handing bfloat16 gradients to the all-reduce)."""
  from qinco_jax.model import _mm
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 9, 48)).astype(np.float32)
  w = rng.standard_normal((48, 24)).astype(np.float32)
  g = rng.standard_normal((64, 9, 24)).astype(np.float32)
  _, vjp = jax.vjp(lambda x, w: _mm(x, w, jnp.bfloat16), jnp.asarray(x), jnp.asarray(w))
  dx, dw = vjp(jnp.asarray(g))
  assert dx.dtype == dw.dtype == jnp.float32

  def bf16(a):  # the operands as the bfloat16 matmul sees them, in float64
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)

  dw_ref = np.einsum("nbi,nbo->io", bf16(x), bf16(g))  # float64: the exact sum
  dx_ref = bf16(g) @ bf16(w).T
  # float32 accumulation: ~1e-6 relative; a bfloat16 result would be off by ~1e-3.
  assert np.abs(np.asarray(dw) - dw_ref).max() < 1e-5 * np.abs(dw_ref).max()
  assert np.abs(np.asarray(dx) - dx_ref).max() < 1e-5 * np.abs(dx_ref).max()


def test_bfloat16_loss_is_reduced_in_float32(trained):
  """Only the step networks' matmuls run in bfloat16: the squared errors, their means
  and the loss are float32, equal to a float64 NumPy reduction of the same bfloat16
  forward (the decoder's partial reconstructions and the pre-selection codewords)."""
  ds, _, _, codec = trained
  c16 = codec.with_dtype("bfloat16")
  model = c16.model()
  params, rest = c16.state.split(nnx.Param, ...)
  x = normalize(model, jnp.asarray(ds.val))
  loss, (codes, _, _, step_mse, pre_loss) = jax.jit(
      lambda p, r, x: train.loss_fn(p, r, c16.graphdef, x, 4, 4))(params, rest, x)
  assert loss.dtype == step_mse.dtype == pre_loss.dtype == jnp.float32
  _, partials = jax.jit(decode_steps)(model, codes)  # (M, N, D) the bfloat16 forward
  part, xs = np.asarray(partials, np.float64), np.asarray(x, np.float64)
  want = ((part - xs[None]) ** 2).mean(axis=(1, 2))
  np.testing.assert_allclose(step_mse, want, rtol=1e-6)
  Cp = np.asarray(model.pre_codebooks[...], np.float64)  # Ls = 0: C'[code] predicts
  chosen = np.stack([Cp[m][np.asarray(codes)[:, m + 1]] for m in range(len(Cp))])
  want_pre = ((part[:-1] + chosen - xs[None]) ** 2).mean(axis=(1, 2)).sum()
  np.testing.assert_allclose(pre_loss, want_pre, rtol=1e-6)
  np.testing.assert_allclose(loss, want.sum() + want_pre, rtol=1e-6)


def test_bfloat16_encoder_ranks_by_float32_distances(trained):
  """The encoder scores candidates by float32 distances of the bfloat16 network's
  outputs: each greedy choice (A=0, B=1) is the nearest candidate by a float64 NumPy
  distance to the same outputs. Distances rounded to bfloat16 (8 bits) would tie or
  swap candidates less than 0.4% apart."""
  ds, _, _, codec = trained
  c16 = codec.with_dtype("bfloat16")
  model = c16.model()
  x = normalize(model, jnp.asarray(ds.val))
  codes = np.asarray(jax.jit(lambda m, x: beam_search(m, x, A=0, B=1).codes)(model, x))
  net_def, net_state = nnx.split(model.steps)
  C_all = model.codebooks[...]

  @jax.jit
  def candidates(m, x_hat):  # f_m(C[k], x_hat) for every k, as the encoder evaluates it
    net = nnx.merge(net_def, jax.tree.map(lambda a: a[m], net_state))
    h0 = net.code_table(C_all[m])[None] + net.beam_term(x_hat)[:, None]
    return net.tail(h0, jnp.broadcast_to(C_all[m], h0.shape[:2] + C_all.shape[-1:]))

  xs = np.asarray(x, np.float64)
  x_hat = np.asarray(model.codebook0[...], np.float64)[codes[:, 0]]
  rows = np.arange(len(xs))
  worse = []
  for m in range(codes.shape[1] - 1):
    f = np.asarray(candidates(m, jnp.asarray(x_hat, jnp.float32)), np.float64)
    dist = ((xs[:, None] - x_hat[:, None] - f) ** 2).sum(-1)  # (N, K)
    best = dist.min(1)
    worse.append((dist[rows, codes[:, m + 1]] - best) / best)
    x_hat = x_hat + f[rows, codes[:, m + 1]]
  assert np.max(worse) < 1e-5, np.max(worse)


def test_short_bfloat16_training_is_within_2_percent_of_float32(trained, tmp_path):
  ds, cfg, tc, codec = trained
  bf = trainer.train_and_evaluate(cfg.replace(dtype="bfloat16"), tc, ds, tmp_path / "bf16",
                                  verbose=False)
  assert bf.cfg.dtype == "bfloat16"
  val = {}
  for name, c in (("f32", codec), ("bf16", bf)):
    val[name] = qj.metrics.mse(np.asarray(ds.val), c.decode(c.encode(ds.val, verbose=False),
                                                           verbose=False))
  assert abs(val["bf16"] / val["f32"] - 1) < 0.02, val


def test_gradient_accumulation_equals_one_large_batch():
  """`accumulate` batches make the update of one batch that many times larger: the
  optimiser receives their mean gradient, nothing is applied before the last batch,
  and every batch's codes are counted. The gradient received is read from Adam's
  moments after the update (mu = (1 - b1) g, nu = (1 - b2) g^2): Adam's step hides a
  gradient's scale, so a sum instead of the mean shows there, and under the recipe's
  element-wise clip at 0.1 it would also clip gradients `accumulate` times larger."""
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((1024, 8)) * 2).astype(np.float32)
  cfg = qj.QincoConfig(K=8, M=3, L=1, de=6, dh=8, A=3, B=2)
  codec = qj.Codec.create(cfg, x, verbose=False)

  def run(accumulate, batches):
    tc = train.TrainConfig(lr=1e-2, accumulate=accumulate, warmup_epochs=0)
    assert tc.grad_clip == 0.1
    tx = train.make_optimizer(tc, steps_per_epoch=8)
    state = train.init_state(codec.graphdef, codec.state, tx)
    step = train.make_train_step(codec.graphdef, tx, 3, 2)
    params = []  # host copies after each batch (the step donates its state)
    for b in batches:
      state, m = step(state, jnp.asarray(b))
      params.append(jax.tree.map(np.array, state.params))
    moments = [jax.tree.leaves(optax.tree_utils.tree_get(state.opt, k)) for k in ("mu", "nu")]
    return params, np.asarray(state.usage), moments, m

  (p_big,), u_big, (mu_big, nu_big), _ = run(1, [x])
  (p_half, p_acc), u_acc, (mu_acc, nu_acc), m = run(2, [x[:512], x[512:]])
  for a, b in zip(jax.tree.leaves(p_big), jax.tree.leaves(p_acc)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  g_big = [np.asarray(v) / 0.1 for v in mu_big]  # the clipped gradient of the big batch
  for g, mu, nu_a, nu_b in zip(g_big, mu_acc, nu_acc, nu_big):
    np.testing.assert_allclose(np.asarray(mu) / 0.1, g, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(nu_a, nu_b, rtol=2e-4, atol=1e-12)
  assert sum(int((np.abs(g) < 0.02).sum()) for g in g_big) > 100  # well below the clip
  np.testing.assert_array_equal(u_big, u_acc)  # codes counted over both halves
  # After only the first half nothing has been applied yet.
  init = jax.tree.map(np.asarray, codec.state.filter(nnx.Param))
  for a, b in zip(jax.tree.leaves(p_half), jax.tree.leaves(init)):
    np.testing.assert_array_equal(a, b)
  # The lr the inner optimiser reports (warm-up 0: the cosine's first value).
  assert float(m["lr"]) == pytest.approx(1e-2 * np.cos(np.pi / 2 * (1 / 4) / 60), rel=1e-5)
