"""Training: schedule, data-parallel equivalence, dead-code reset, divergence, resume."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import qinco_jax as qj
from qinco_jax import checkpoint, train, trainer
from qinco_jax.decode import normalize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lr_schedule_matches_spec():
  # warm-up 3, quarter cosine 60 (ending with the 63 epochs trained), floor 1e-3
  t = jnp.array([0.0, 1.5, 3.0, 33.0, 63.0, 80.0])
  expected = [1e-3, 0.5, 1.0, np.cos(np.pi / 4), 1e-3, 1e-3]
  for cfg in (train.TrainConfig(), train.TrainConfig(epochs=71, cosine_epochs=60)):
    np.testing.assert_allclose(train.lr_factor(t, cfg), expected, rtol=1e-5, atol=1e-7)
  assert train.TrainConfig().epochs == 63
  # `epochs` is what is trained: the cosine of a 20-epoch run ends at epoch 20.
  short = train.TrainConfig(epochs=20, warmup_epochs=2)
  np.testing.assert_allclose(train.lr_factor(jnp.array([11.0, 20.0]), short),
                             [np.cos(np.pi / 4), 1e-3], rtol=1e-5)
  # A run shorter than two warm-ups: half warm-up, half cosine, still annealed.
  tiny = train.TrainConfig(epochs=2, warmup_epochs=3)
  np.testing.assert_allclose(train.lr_factor(jnp.array([0.5, 1.0, 2.0]), tiny),
                             [0.5, 1.0, 1e-3], rtol=1e-5)


@pytest.mark.parametrize("field,value,match", [
    ("lr", 0.0, "lr must be > 0"), ("batch_per_device", 0, "batch_per_device must be > 0"),
    ("loop", 0, "loop must be > 0"), ("epochs", 0, "epochs must be > 0"),
    ("accumulate", 0, "accumulate must be > 0"),
    ("cosine_epochs", 0.0, "cosine_epochs must be > 0 or None"),
    ("optimizer", "sgd", "optimizer must be 'adamw' or 'adam', got 'sgd'"),
    ("schedule", "step", "schedule must be 'cosine' or 'plateau', got 'step'")])
def test_train_config_refuses_what_it_cannot_train_with(field, value, match):
  with pytest.raises(ValueError, match=match):
    train.TrainConfig(**{field: value})
  smallest = {"lr": 1e-9, "batch_per_device": 1, "loop": 1, "epochs": 1, "accumulate": 1,
              "cosine_epochs": 1e-3, "optimizer": "adam", "schedule": "plateau"}[field]
  assert getattr(train.TrainConfig(**{field: smallest}), field) == smallest


def test_optimizer_lr_follows_fractional_epochs():
  cfg = train.TrainConfig(lr=1.0, warmup_epochs=1, epochs=3)  # a 2-epoch cosine
  tx = train.make_optimizer(cfg, steps_per_epoch=4)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  lrs = []
  for _ in range(8):
    _, state = tx.update({"w": jnp.ones(3)}, state, params)
    lrs.append(float(train.current_lr(state)))
  # t = (count + 1) / 4 before each batch: 0.25, 0.5, 0.75, 1 then cos(pi/2 * (t-1)/2)
  expected = [0.25, 0.5, 0.75, 1.0] + [np.cos(np.pi / 4 * s) for s in (0.25, 0.5, 0.75, 1.0)]
  np.testing.assert_allclose(lrs, np.maximum(expected, 1e-3), rtol=1e-5)


def _tiny(seed=0, d=8):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((2048, d)) * 2).astype(np.float32)
  cfg = qj.QincoConfig(K=8, M=3, L=1, de=6, dh=8, A=3, B=2)
  return qj.Codec.create(cfg, x, verbose=False), x


def _run_steps(codec, x, devices, n_steps=3, tc=None, same_batch=False):
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  tx = train.make_optimizer(tc or train.TrainConfig(), steps_per_epoch=10)
  state = jax.device_put(train.init_state(codec.graphdef, codec.state, tx),
                         NamedSharding(mesh, P()))
  step = train.make_train_step(codec.graphdef, tx, 3, 2)
  losses = []
  for i in range(n_steps):
    rows = slice(0, 256) if same_batch else slice(i * 256, (i + 1) * 256)
    batch = jax.device_put(x[rows], NamedSharding(mesh, P("data")))
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  return losses, jax.tree.map(np.asarray, state.params), np.asarray(state.usage)


def _documented_rows(n, S, G, seed, epoch, step):
  """The global batch of update `step` of `epoch` as the docs define it, one row at a
  time: pass p is the permutation default_rng([seed, p]).permutation(n), and epoch e
  covers positions [e*S, e*S + steps*G) of the passes laid end to end."""
  perms = {}
  rows = []
  for pos in range(epoch * S + step * G, epoch * S + (step + 1) * G):
    p = pos // n
    if p not in perms:
      perms[p] = np.random.default_rng([seed, p]).permutation(n)
    rows.append(perms[p][pos % n])
  return np.array(rows)


def test_each_device_trains_on_its_own_rows_of_the_documented_order(tmp_path, monkeypatch):
  """The trainer on 2 devices: every update equals one device computing the whole
  global batch of the documented order from the same state, and each device holds its
  own slice of that batch (here an epoch is 600 of the 1,000 rows, so epoch 1's last
  batch runs across the end of the first pass)."""
  assert jax.device_count() == 2
  ds = qj.data.load_synthetic(n_train=1000, n_db=10, n_queries=1, d=8, n_val=100)
  cfg = qj.QincoConfig(K=8, M=2, L=1, de=None, dh=8, A=2, B=2)
  tc = train.TrainConfig(epochs=2, warmup_epochs=0, batch_per_device=128, loop=600,
                         seed=3, log_every=100)
  make_step = train.make_train_step
  seen = []  # (state before, the batch's shards, state after) of every update

  def recording(*a, **k):
    step = make_step(*a, **k)

    def run(state, batch):
      before = jax.tree.map(np.array, state)  # host copy (the step donates its state)
      shards = sorted((s.index[0].start or 0, np.array(s.data))
                      for s in batch.addressable_shards)
      out = step(state, batch)
      seen.append((before, shards, jax.tree.map(np.array, out)))
      return out
    return run

  monkeypatch.setattr(train, "make_train_step", recording)
  codec = trainer.train_and_evaluate(cfg, tc, ds, tmp_path / "run", verbose=False)
  steps, G = 600 // 256, 256
  assert len(seen) == 2 * steps
  tx = train.make_optimizer(tc, steps)
  one = jax.devices()[0]
  reference_step = make_step(codec.graphdef, tx, cfg.A, cfg.B)
  for i, (before, shards, after) in enumerate(seen):
    rows = _documented_rows(1000, 600, G, tc.seed, *divmod(i, steps))
    want = reference_step(jax.device_put(before, one), jax.device_put(ds.train[rows], one))
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(want)):  # state and metrics
      np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-6)
    assert [start for start, _ in shards] == [0, 128]
    for start, got in shards:
      np.testing.assert_array_equal(got, ds.train[rows[start:start + 128]])


@pytest.mark.parametrize("chunk", [None, 32, 48, 127])
def test_the_steps_sharded_chunked_beam_search_is_the_whole_batch_search(chunk):
  """The step's encoder (`train.encode_batch` on each device's rows under shard_map, in
  chunks; 48 and 127 do not divide the 128 rows of a device) against `beam_search` of the
  whole batch at once (`train.loss_fn`): the same codes, and the target statistics
  of every step those of the whole batch."""
  codec, x = _tiny()
  mesh = trainer.data_mesh(jax.devices()[:2])
  params, rest = codec.state.split(nnx.Param, ...)
  model = nnx.merge(codec.graphdef, codec.state)
  xn = normalize(model, jnp.asarray(x[:256]))
  _, (codes, mean, std, _, _) = train.loss_fn(params, rest, codec.graphdef, xn, 3, 2)

  def local(p, r, xs):
    return train.encode_batch(nnx.merge(codec.graphdef, p, r), xs, 3, 2, chunk,
                              axis="data")
  sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data")),
                                  out_specs=(P("data"), P(), P()), check_vma=False))
  c2, m2, s2 = sharded(params, rest, jax.device_put(xn, NamedSharding(mesh, P("data"))))
  np.testing.assert_array_equal(np.asarray(c2), np.asarray(codes))
  np.testing.assert_allclose(np.asarray(m2), np.asarray(mean), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s2), np.asarray(std), rtol=1e-5)
  # and without a mesh (one device, chunks only)
  c3, m3, s3 = train.encode_batch(model, xn, 3, 2, chunk)
  np.testing.assert_array_equal(np.asarray(c3), np.asarray(codes))
  np.testing.assert_allclose(np.asarray(s3), np.asarray(std), rtol=1e-5)


def test_training_lowers_the_loss():
  codec, x = _tiny(seed=1)
  tc = train.TrainConfig(lr=3e-3, warmup_epochs=0)
  losses, _, _ = _run_steps(codec, x, jax.devices()[:1], n_steps=8, tc=tc, same_batch=True)
  # The "rq" init starts at the RQ solution, which is near-optimal on Gaussian data:
  # the loss goes down steadily, if slowly (its value is checked in test_loss_oracle).
  assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_dead_code_reset_replaces_only_unused_rows():
  codec, x = _tiny()
  tx = train.make_optimizer(train.TrainConfig(), 10)
  state = train.init_state(codec.graphdef, codec.state, tx)
  usage = np.ones((3, 8), np.int32)
  usage[0, 2] = usage[1, 5] = usage[2, 0] = 0
  state = state._replace(usage=jnp.asarray(usage))
  new, n_reset = train.reset_dead_codes(state, jax.random.key(0), 0.1)
  np.testing.assert_array_equal(n_reset, [1, 1, 1])
  old_c0 = np.asarray(state.params["codebook0"][...])
  new_c0 = np.asarray(new.params["codebook0"][...])
  changed = np.any(old_c0 != new_c0, axis=1)
  np.testing.assert_array_equal(changed, usage[0] == 0)
  old_c = np.asarray(state.params["codebooks"][...])
  new_c = np.asarray(new.params["codebooks"][...])
  np.testing.assert_array_equal(np.any(old_c != new_c, axis=2), usage[1:] == 0)
  new_p = np.asarray(new.params["pre_codebooks"][...])
  # C' row = the new C row plus small noise (0.025 x the table's std).
  diff = new_p[0, 5] - new_c[0, 5]
  assert 0 < np.abs(diff).max() < 0.2 * np.abs(new_c[0, 5]).max() + 1e-3
  assert np.asarray(new.usage).sum() == 0
  # M = 1: a plain RQ step and no network step.
  rq = qj.Codec.create(qj.QincoConfig(K=8, M=1, A=0, B=1), x[:500], verbose=False)
  state = train.init_state(rq.graphdef, rq.state, tx)
  state = state._replace(usage=jnp.asarray(usage[:1]))
  new, n_reset = train.reset_dead_codes(state, jax.random.key(0), 0.1)
  np.testing.assert_array_equal(n_reset, [1])
  changed = np.any(np.asarray(new.params["codebook0"][...])
                   != np.asarray(state.params["codebook0"][...]), axis=1)
  np.testing.assert_array_equal(changed, usage[0] == 0)


def test_divergence_stops_with_a_clear_error_and_keeps_best(tmp_path):
  ds = qj.data.load_synthetic(n_train=1024, n_db=100, n_queries=10, d=8, n_val=200)
  cfg = qj.QincoConfig(K=8, M=2, L=1, de=None, dh=8, A=2, B=2)
  tc = train.TrainConfig(lr=1e9, weight_decay=0.0, grad_clip=None, warmup_epochs=0,
                         epochs=2, batch_per_device=128, log_every=1)
  with pytest.raises(FloatingPointError, match="diverged"):
    trainer.train_and_evaluate(cfg, tc, ds, tmp_path / "run", verbose=False)
  qj.load(tmp_path / "run")  # the best (initial) codec is intact


def test_existing_workdir_needs_resume(tmp_path):
  ds = qj.data.load_synthetic(n_train=1024, n_db=100, n_queries=10, d=8, n_val=200)
  cfg = qj.QincoConfig(K=8, M=2, L=1, de=None, dh=8, A=2, B=2)
  tc = train.TrainConfig(epochs=1, warmup_epochs=0, batch_per_device=256)
  trainer.train_and_evaluate(cfg, tc, ds, tmp_path / "run", verbose=False)
  with pytest.raises(ValueError, match="resume"):
    trainer.train_and_evaluate(cfg, tc, ds, tmp_path / "run", verbose=False)


def test_training_checkpoint_with_a_flipped_bit_is_refused_on_restore(tmp_path):
  """A training checkpoint whose arrays Orbax reads back fine but whose bytes changed
  after the save (one bit of one weight, rewritten through Orbax by hand) is refused
  by the checksums saved with it, naming the checkpoint and the array."""
  import orbax.checkpoint as ocp
  rng = np.random.default_rng(0)
  state = {"params": {"w": rng.standard_normal((4, 3)).astype(np.float32)},
           "step": np.asarray(7, np.int32)}
  ckpts = checkpoint.TrainCheckpoints(tmp_path / "ckpt")
  try:
    ckpts.save(1, state, {"epoch": 1})
    back, meta = ckpts.restore(state)
    assert meta == {"epoch": 1} and np.array_equal(back["params"]["w"], state["params"]["w"])
    damaged = jax.tree.map(np.array, state)
    damaged["params"]["w"].view(np.uint8)[0, 0] ^= 1  # lowest mantissa bit of w[0, 0]
    ck = ocp.StandardCheckpointer()
    try:
      ck.save(tmp_path / "ckpt" / "1" / "state", damaged, force=True)
      ck.wait_until_finished()
    finally:
      ck.close()
    with pytest.raises(ValueError, match="corrupt") as e:
      ckpts.restore(state)
  finally:
    ckpts.close()
  assert str(tmp_path / "ckpt" / "1") in str(e.value) and "params/w" in str(e.value)


_CHILD = textwrap.dedent("""
    import os, signal, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    import qinco_jax as qj
    from qinco_jax import train, trainer
    workdir, mode = sys.argv[1], sys.argv[2]
    if mode == "kill":  # die (SIGKILL) right after the first epoch's checkpoint
      orig = trainer._save
      def save_then_die(*a, **k):
        orig(*a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
      trainer._save = save_then_die
    ds = qj.data.load_synthetic(n_train=1536, n_db=100, n_queries=10, d=8, n_val=200)
    # K=256 on 1,536 vectors leaves codes unused: the resumed run must replay the
    # dead-codeword resets (same rows, same key) as the uninterrupted one.
    cfg = qj.QincoConfig(K=256, M=3, L=1, de=None, dh=8, A=2, B=2)
    tc = train.TrainConfig(epochs=3, warmup_epochs=1, stop_patience=5,
                           batch_per_device=128, log_every=2)
    codec = trainer.train_and_evaluate(cfg, tc, ds, workdir, resume=(mode == "resume"),
                                       verbose=False)
    codec.save(os.path.join(workdir, "final"))
""")


def _child(workdir, mode):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-c", _CHILD, str(workdir), mode], env=env,
                        capture_output=True, text=True, timeout=300)


def test_resume_after_kill_ends_where_an_uninterrupted_run_ends(tmp_path):
  r = _child(tmp_path / "a", "kill")
  assert r.returncode == -9, r.stderr[-2000:]
  assert not (tmp_path / "a" / "final").exists()
  r = _child(tmp_path / "a", "resume")
  assert r.returncode == 0, r.stderr[-2000:]
  r = _child(tmp_path / "b", "plain")
  assert r.returncode == 0, r.stderr[-2000:]
  a, b = qj.load(tmp_path / "a" / "final"), qj.load(tmp_path / "b" / "final")
  fa = jax.tree.leaves(jax.tree.map(np.asarray, a.state))
  fb = jax.tree.leaves(jax.tree.map(np.asarray, b.state))
  for x, y in zip(fa, fb):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  log_a = trainer.read_metrics(tmp_path / "a" / "metrics.jsonl")
  log_b = trainer.read_metrics(tmp_path / "b" / "metrics.jsonl")
  assert any(r.get("epoch") == 2 and "val_mse" in r for r in log_a)
  # The resumed run counts its updates on from the checkpoint's, as the other counts.
  after = [(r["epoch"], r["step"]) for r in log_a if r.get("epoch", -1) >= 1 and "step" in r]
  assert after == [(r["epoch"], r["step"]) for r in log_b
                   if r.get("epoch", -1) >= 1 and "step" in r]
  assert sum(sum(r["resets"]) for r in log_a if r.get("epoch", -1) >= 1 and "resets" in r) > 0


def test_budget_lr_matches_spec_values_in_steps():
  # 4 steps per epoch, 2 warm-up epochs (8 steps), cosine ending at step 28 (20 steps).
  cfg = train.TrainConfig(lr=1.0, warmup_epochs=2, epochs=5, time_budget_s=60.0)
  got = [train.budget_lr(s, 4, 28, cfg) for s in (0, 3, 7, 17, 27, 40)]
  # update s runs at t = s + 1 steps: warm-up t/8, then cos(pi/2 * (t - 8) / 20), floor
  expected = [1 / 8, 4 / 8, 1.0, np.cos(np.pi / 4), 1e-3, 1e-3]
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # A shorter plan ends the cosine sooner: at step 17 (t=18) of a 18-step plan, floor.
  assert train.budget_lr(17, 4, 18, cfg) == pytest.approx(1e-3)
  # A plan shorter than two warm-ups (8 steps < 16) warms up over half of it (4 steps)
  # and still anneals to the floor by its last update, instead of stopping at lr 1.
  got = [train.budget_lr(s, 4, 8, cfg) for s in (0, 3, 5, 7)]
  np.testing.assert_allclose(got, [1 / 4, 1.0, np.cos(np.pi / 4), 1e-3], rtol=1e-6)
  with pytest.raises(ValueError, match="time_budget_s"):
    train.TrainConfig(time_budget_s=0)
  with pytest.raises(ValueError, match="cosine"):
    train.TrainConfig(time_budget_s=10, schedule="plateau")


class _ScriptedTime:
  """A clock for the trainer in which time passes only when it works: each update
  costs `step_s` and each validation `val_s` seconds, whatever the machine's speed."""

  def __init__(self, monkeypatch, step_s, val_s):
    self.now = 0.0
    make_step, validate = train.make_train_step, trainer.validate

    def make_train_step(*a, **k):
      step = make_step(*a, **k)

      def timed(state, batch):
        self.now += step_s
        return step(state, batch)
      return timed

    def timed_validate(*a, **k):
      self.now += val_s
      return validate(*a, **k)

    monkeypatch.setattr(train, "make_train_step", make_train_step)
    monkeypatch.setattr(trainer, "validate", timed_validate)

  def __call__(self):
    return self.now


def _train_log(cfg, tc, ds, tmp_path, clock):
  """Trains into tmp_path/run; returns its metrics log and the end-of-epoch records."""
  trainer.train_and_evaluate(cfg, tc, ds, tmp_path / "run", verbose=False, clock=clock)
  log = trainer.read_metrics(tmp_path / "run")
  return log, [r for r in log if "train_s" in r]


def test_time_budget_ends_the_run_and_anneals_the_lr(tmp_path, monkeypatch):
  ds = qj.data.load_synthetic(n_train=2048, n_db=100, n_queries=10, d=8, n_val=200)
  cfg = qj.QincoConfig(K=8, M=2, L=1, de=None, dh=8, A=2, B=2)
  # The seed plan (1 + 1000 epochs) is far too long: the re-plan must cut it to the
  # budget, and the lr must reach the floor at the end of the (re-planned) run.
  tc = train.TrainConfig(epochs=1000, warmup_epochs=1, batch_per_device=128,
                         stop_patience=10**6, time_budget_s=10.0, log_every=1)
  clock = _ScriptedTime(monkeypatch, step_s=0.02, val_s=0.5)  # 8 updates per epoch
  log, epochs = _train_log(cfg, tc, ds, tmp_path, clock)
  assert 2 <= len(epochs) < 1000
  # used the budget; the plan, re-made from the time per update, may overrun it by
  # less than one epoch's validation (0.5 s)
  assert 9.0 < epochs[-1]["elapsed_s"] < 10.0 + 0.5
  assert epochs[-1]["step"] == epochs[-2]["plan_steps"]  # stopped where planned
  assert epochs[-1]["plan_steps"] == epochs[-1]["step"]  # and no re-plan after it
  assert epochs[-2]["step"] < epochs[-2]["plan_steps"]  # (no sliver epoch at the end)
  lrs = [r["lr"] for r in log if "lr" in r]
  assert max(lrs) == pytest.approx(tc.lr, rel=1e-3)
  assert lrs[-1] < 0.05 * tc.lr  # annealed, not cut off at full lr
  # The reported rates: one global batch (128 rows a device) per 0.02 s of updates.
  G = 128 * jax.device_count()
  steps = [r for r in log if "loss" in r]
  assert len(steps) == epochs[-1]["step"]  # log_every=1: every update is logged
  assert all(r["samples_s"] == pytest.approx(G / 0.02) for r in steps + epochs)


def test_time_budget_holds_inside_a_long_first_epoch(tmp_path, monkeypatch):
  """One epoch far longer than the budget (31,250 updates of 10 ms): the run must
  stop inside it, at the budget, not at the epoch's end."""
  rng = np.random.default_rng(0)
  train_x = rng.standard_normal((2_000_000, 4)).astype(np.float32)
  ds = qj.data.Dataset("big", train_x, train_x[:200], None, None, None, 1.0)
  cfg = qj.QincoConfig(K=4, M=2, L=1, de=None, dh=4, A=2, B=2)
  tc = train.TrainConfig(epochs=10, warmup_epochs=0.001, batch_per_device=32,
                         stop_patience=10**6, time_budget_s=8.0, log_every=200)
  clock = _ScriptedTime(monkeypatch, step_s=0.01, val_s=0.2)
  log, epochs = _train_log(cfg, tc, ds, tmp_path, clock)
  assert len(epochs) == 1 and epochs[0]["samples"] < len(train_x) // 2
  assert 7.0 < epochs[0]["elapsed_s"] <= 8.0
  assert epochs[0]["step"] == epochs[0]["plan_steps"]


def test_a_budget_spent_before_the_first_update_is_said_and_logged(tmp_path, monkeypatch):
  """The start of a run (RQ initialisation, initial validation) is not cut by the
  time budget: here the initial validation alone takes 12 s of a 10 s budget. The run
  says so, makes the first guard's 3 updates, validates them, and says by how much it
  ran past the budget; both warnings are also in metrics.jsonl."""
  ds = qj.data.load_synthetic(n_train=2048, n_db=100, n_queries=10, d=8, n_val=200)
  cfg = qj.QincoConfig(K=8, M=2, L=1, de=None, dh=8, A=2, B=2)
  tc = train.TrainConfig(epochs=1000, warmup_epochs=1, batch_per_device=128,
                         stop_patience=10**6, time_budget_s=10.0, log_every=1)
  clock = _ScriptedTime(monkeypatch, step_s=0.02, val_s=12.0)
  with pytest.warns(UserWarning) as caught:
    log, epochs = _train_log(cfg, tc, ds, tmp_path, clock)
  notes = [str(w.message) for w in caught if "time budget" in str(w.message)]
  assert len(notes) == 2
  assert notes[0].startswith("the time budget (10 s) was spent before the first update: "
                             "12 s went to the start of training")
  assert "so at most 3 updates run" in notes[0]
  assert len(epochs) == 1 and epochs[0]["step"] == 3
  assert epochs[0]["elapsed_s"] == pytest.approx(12 + 3 * 0.02 + 12)
  assert notes[1].startswith("training took 24 s, 14 s past its time budget (10 s): the "
                             "12 s before the first update")
  assert [r["warning"] for r in log if "warning" in r] == notes


def _scripted_run(tmp_path, monkeypatch, val_mses, stop_patience, tc=None):
  """Trains the tiny model with validation numbers replaced by `val_mses` (initial
  first). Returns (returned codec, the codecs validated in order, epoch records)."""
  seen = []
  script = iter(val_mses)

  def fake_validate(codec, val, A, B, mse_scale):
    seen.append(codec)
    v = next(script)
    return {"val_mse": v, "val_per_step_mse": [v], "val_mean_entropy": 1.0}

  monkeypatch.setattr(trainer, "validate", fake_validate)
  ds = qj.data.load_synthetic(n_train=1024, n_db=100, n_queries=10, d=8, n_val=200)
  cfg = qj.QincoConfig(K=8, M=2, L=1, de=None, dh=8, A=2, B=2)
  tc = (tc or train.TrainConfig(epochs=20, warmup_epochs=0)).replace(
      stop_patience=stop_patience, batch_per_device=256, log_every=1)
  best = trainer.train_and_evaluate(cfg, tc, ds, tmp_path / "run", verbose=False)
  log = trainer.read_metrics(tmp_path / "run" / "metrics.jsonl")
  return best, seen, [r for r in log if "train_s" in r], log


def _same_state(a, b):
  return all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(jax.tree.map(np.asarray, a.state)),
      jax.tree.leaves(jax.tree.map(np.asarray, b.state))))


def test_best_model_selection_and_early_stopping_follow_validation(tmp_path, monkeypatch):
  # initial 5.0; epochs: 6.0 (bad 1), 4.0 (best), 4.5, 4.2, 4.1 (bad 3 > 2: stop)
  best, seen, epochs, _ = _scripted_run(tmp_path, monkeypatch,
                                        [5.0, 6.0, 4.0, 4.5, 4.2, 4.1, 3.0], 2)
  assert [r["epoch"] for r in epochs] == [0, 1, 2, 3, 4]
  assert [r["best_val_mse"] for r in epochs] == [5.0, 4.0, 4.0, 4.0, 4.0]
  assert len(seen) == 6  # initial + 5 epochs; the 3.0 was never asked for
  assert _same_state(best, seen[2]) and not _same_state(best, seen[5])


def test_training_that_never_beats_the_initial_model_returns_it(tmp_path, monkeypatch):
  best, seen, epochs, _ = _scripted_run(tmp_path, monkeypatch, [5.0, 5.5, 6.0, 5.0], 2)
  assert len(epochs) == 3  # 3 epochs without improvement (> stop_patience 2)
  assert _same_state(best, seen[0])  # the initial (RQ-initialised) codec
  assert not _same_state(best, seen[1])


def test_plateau_schedule_divides_the_lr_by_10_after_patience_bad_epochs(tmp_path,
                                                                        monkeypatch):
  """The qinco1 recipe: lr x 0.1 after every `plateau_patience` epochs without a
  validation improvement, never below lr x 1e-2 (hand-computed from scripted values)."""
  tc = train.train_preset("qinco1", plateau_patience=2, epochs=7)
  _, _, epochs, log = _scripted_run(tmp_path, monkeypatch, [5.0] + [6.0] * 7, 100, tc)
  assert len(epochs) == 7
  lr = [[r["lr"] for r in log if r.get("epoch") == e and "lr" in r][-1] for e in range(7)]
  # bad epochs 1, 2 (-> x0.1), 3, 4 (-> x0.1 = the floor 1e-6), 5, 6 (floor), 7
  np.testing.assert_allclose(lr, [1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6, 1e-6], rtol=1e-5)


def _tiny_run(tmp_path, **tc_kw):
  ds = qj.data.load_synthetic(n_train=1024, n_db=100, n_queries=10, d=8, n_val=200)
  cfg = qj.QincoConfig(K=8, M=2, L=1, de=None, dh=8, A=2, B=2)
  tc = train.TrainConfig(**{**dict(epochs=1, warmup_epochs=0,
                                   batch_per_device=256), **tc_kw})
  return ds, cfg, tc


def test_resume_refuses_another_model_and_warns_about_other_settings(tmp_path):
  ds, cfg, tc = _tiny_run(tmp_path)
  trainer.train_and_evaluate(cfg, tc, ds, tmp_path / "run", verbose=False)
  with pytest.raises(ValueError, match=r"another model \(M: 2 in the checkpoint, 4 asked"):
    trainer.train_and_evaluate(cfg.replace(M=4), tc, ds, tmp_path / "run", resume=True,
                               verbose=False)
  with pytest.raises(ValueError, match=r"L: 1 in the checkpoint, 2 asked.*dh: 8 in"):
    trainer.train_and_evaluate(cfg.replace(L=2, dh=16), tc, ds, tmp_path / "run",
                               resume=True, verbose=False)
  more = tc.replace(lr=1e-3, epochs=2)
  with pytest.warns(UserWarning, match=r"lr 0.0008 -> 0.001.*epochs 1 -> 2"):
    trainer.train_and_evaluate(cfg, more, ds, tmp_path / "run", resume=True,
                               verbose=False)
  log = trainer.read_metrics(tmp_path / "run")
  notes = [r for r in log if "warning" in r]
  assert len(notes) == 1 and notes[0]["changed"]["lr"] == [8e-4, 1e-3]
  assert max(r["epoch"] for r in log if "train_s" in r) == 1  # the new setting applied


def test_a_second_training_in_a_busy_workdir_is_refused(tmp_path):
  import socket
  ds, cfg, tc = _tiny_run(tmp_path)
  work = tmp_path / "run"
  work.mkdir()
  holder = {"host": socket.gethostname(), "pid": os.getppid(), "since": "earlier"}
  (work / ".lock").write_text(json.dumps(holder))
  with pytest.raises(RuntimeError, match=f"in use by another training \\(process "
                                         f"{os.getppid()} on host"):
    trainer.train_and_evaluate(cfg, tc, ds, work, verbose=False)
  assert json.loads((work / ".lock").read_text()) == holder  # not taken over
  assert not (work / "ckpt").exists()
  # A lock whose process is gone (killed) is taken over, and released at the end.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  (work / ".lock").write_text(json.dumps({**holder, "pid": int(dead)}))
  with pytest.warns(UserWarning, match="taking over the lock"):
    trainer.train_and_evaluate(cfg, tc, ds, work, verbose=False)
  assert not (work / ".lock").exists()


def test_metrics_never_hold_a_torn_line(tmp_path, monkeypatch):
  w = trainer.MetricWriter(tmp_path)
  w.write({"epoch": 0, "val_mse": 1.5})
  real_write = os.write

  def disk_full(fd, b):  # writes a few bytes, then the disk is full
    real_write(fd, b[:7])
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(trainer.os, "write", disk_full)
  with pytest.raises(OSError, match="No space"):
    w.write({"epoch": 1, "val_mse": 1.25})
  monkeypatch.setattr(trainer.os, "write", real_write)
  assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 0, "val_mse": 1.5}\n'
  # A file torn by a killed writer (an older version, another tool): readers skip it.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"epoch": 1, "val_m')
  assert trainer.read_metrics(tmp_path) == [{"epoch": 0, "val_mse": 1.5}]


def test_bad_values_in_the_data_are_named_with_their_rows(tmp_path):
  ds, cfg, tc = _tiny_run(tmp_path)
  val = np.array(ds.val)
  val[7, 3] = np.nan
  bad_val = qj.data.Dataset(ds.name, ds.train, val, None, None, None)
  with pytest.raises(ValueError, match="validation vectors.*first bad row is 7"):
    trainer.train_and_evaluate(cfg, tc, bad_val, tmp_path / "a", verbose=False)
  x = np.array(ds.train)
  x[900, 0] = np.inf
  bad_train = qj.data.Dataset(ds.name, x, ds.val, None, None, None)
  with pytest.raises(ValueError, match="train_x.*first bad row is 900"):
    trainer.train_and_evaluate(cfg, tc, bad_train, tmp_path / "b", verbose=False)
  # Rows beyond those the RQ initialisation reads (1M) are checked as batches read
  # them, and named by their row in the training set.
  with pytest.raises(ValueError, match="training vector 900 "):
    trainer._read_rows(x, np.array([3, 900, 1]))


def _files(work):
  """{relative path: bytes} of every file under work (what a run must not change)."""
  return {str(p.relative_to(work)): p.read_bytes() for p in sorted(work.rglob("*"))
          if p.is_file()}


def test_a_fresh_start_never_replaces_the_results_of_a_run_that_checkpointed(tmp_path):
  ds, cfg, tc = _tiny_run(tmp_path)
  work = tmp_path / "run"
  trainer.train_and_evaluate(cfg, tc, ds, work, verbose=False)
  import shutil
  shutil.rmtree(work / "ckpt")  # the user frees space; the results stay
  before = _files(work)
  for resume in (False, True):
    with pytest.raises(ValueError, match=r"holds best, metrics.jsonl, ckpt_meta.json \(the "
                                         r"results of an earlier training\) but no "
                                         "checkpoint to resume from"):
      trainer.train_and_evaluate(cfg, tc, ds, work, resume=resume, verbose=False)
  assert _files(work) == before and not (work / "ckpt").exists()


def test_a_fresh_start_refuses_files_of_its_names_that_no_training_wrote(tmp_path):
  ds, cfg, tc = _tiny_run(tmp_path)
  work = tmp_path / "mine"
  work.mkdir()
  (work / "metrics.jsonl").write_text('{"my": "numbers"}\n')
  with pytest.raises(ValueError, match=r"holds metrics.jsonl \(files that no training "
                                       r"wrote here\)"):
    trainer.train_and_evaluate(cfg, tc, ds, work, verbose=False)
  assert sorted(os.listdir(work)) == ["metrics.jsonl"]
  assert (work / "metrics.jsonl").read_text() == '{"my": "numbers"}\n'


def test_a_start_stopped_before_its_first_checkpoint_may_start_again(tmp_path, monkeypatch):
  ds, cfg, tc = _tiny_run(tmp_path)

  def stopped(*a, **k):
    raise KeyboardInterrupt  # Ctrl-C during the first epoch, before any checkpoint

  monkeypatch.setattr(trainer, "_save", stopped)
  with pytest.raises(KeyboardInterrupt):
    trainer.train_and_evaluate(cfg, tc, ds, tmp_path / "run", verbose=False)
  assert (tmp_path / "run" / "best").exists()  # the initial codec, a first record
  monkeypatch.undo()
  trainer.train_and_evaluate(cfg, tc, ds, tmp_path / "run", verbose=False)
  log = trainer.read_metrics(tmp_path / "run")
  # The earlier start's log was replaced: one initial record, one record of epoch 0.
  assert [r["epoch"] for r in log if "val_mse" in r] == [-1, 0]
  assert [r["epoch"] for r in log if "loss" in r] == [0]


@pytest.mark.parametrize("field,value,match", [
    ("stop_patience", -1, "stop_patience must be >= 0"),
    ("plateau_patience", 0, "plateau_patience must be >= 1"),
    ("lr", float("nan"), "lr must be > 0, got nan"),
    ("weight_decay", float("nan"), "weight_decay must be a finite number"),
    ("lr_min_fact", float("inf"), "lr_min_fact must be a finite number"),
    ("log_every", 0, "log_every must be > 0")])
def test_train_config_refuses_values_that_would_train_otherwise_than_asked(field, value,
                                                                          match):
  with pytest.raises(ValueError, match=match):
    train.TrainConfig(**{field: value})


def test_resume_on_other_vectors_of_the_same_shape_is_named(tmp_path):
  ds, cfg, tc = _tiny_run(tmp_path)
  trainer.train_and_evaluate(cfg, tc, ds, tmp_path / "run", verbose=False)
  other = qj.data.load_synthetic(n_train=1024, n_db=100, n_queries=10, d=8, n_val=200,
                                 seed=5)
  assert other.train.shape == ds.train.shape
  with pytest.warns(UserWarning, match=r"train_data '[0-9a-f]{16}' -> '[0-9a-f]{16}'"):
    trainer.train_and_evaluate(cfg, tc.replace(epochs=2), other, tmp_path / "run",
                               resume=True, verbose=False)
  (note,) = [r for r in trainer.read_metrics(tmp_path / "run") if "warning" in r]
  assert note["changed"]["train_data"] == [trainer.fingerprint(ds.train),
                                           trainer.fingerprint(other.train)]
  assert trainer.fingerprint(ds.train) == trainer.fingerprint(np.array(ds.train))


def test_resume_on_vectors_of_another_dimension_is_refused(tmp_path):
  ds, cfg, tc = _tiny_run(tmp_path)
  trainer.train_and_evaluate(cfg, tc, ds, tmp_path / "run", verbose=False)
  wider = qj.data.load_synthetic(n_train=1024, n_db=100, n_queries=10, d=12, n_val=200)
  with pytest.raises(ValueError, match="on vectors of dimension 12: its model was "
                                       "trained on dimension 8"):
    trainer.train_and_evaluate(cfg, tc.replace(epochs=2), wider, tmp_path / "run",
                               resume=True, verbose=False)


def test_a_stop_between_checkpoint_and_record_loses_no_record(tmp_path, monkeypatch):
  ds, cfg, tc = _tiny_run(tmp_path, epochs=2)
  orig = trainer._save

  def save_then_stop(*a, **k):
    orig(*a, **k)
    raise KeyboardInterrupt  # Ctrl-C right after the first epoch's checkpoint

  monkeypatch.setattr(trainer, "_save", save_then_stop)
  with pytest.raises(KeyboardInterrupt):
    trainer.train_and_evaluate(cfg, tc, ds, tmp_path / "run", verbose=False)
  assert [r["epoch"] for r in trainer.read_metrics(tmp_path / "run") if "val_mse" in r] \
      == [-1]
  monkeypatch.undo()
  trainer.train_and_evaluate(cfg, tc, ds, tmp_path / "run", resume=True, verbose=False)
  trainer.train_and_evaluate(cfg, tc, ds, tmp_path / "run", resume=True, verbose=False)
  log = [r for r in trainer.read_metrics(tmp_path / "run") if "val_mse" in r]
  assert [r["epoch"] for r in log] == [-1, 0, 1]  # each epoch once, in order
  # The written record is the stopped epoch's own: its validation is the codec saved
  # as best then, or the initial one.
  best = qj.load(tmp_path / "run")
  assert log[0]["val_mse"] >= log[1]["best_val_mse"] >= log[2]["best_val_mse"]
  assert log[2]["best_val_mse"] == pytest.approx(
      trainer.validate(best, ds.val, 2, 2, ds.mse_scale)["val_mse"], rel=1e-5)


@pytest.mark.parametrize("damage", ["delete", "binary", "list"])
def test_damaged_run_metadata_is_named_with_its_path(tmp_path, damage):
  ds, cfg, tc = _tiny_run(tmp_path)
  trainer.train_and_evaluate(cfg, tc, ds, tmp_path / "run", verbose=False)
  meta = tmp_path / "run" / "ckpt_meta.json"
  if damage == "delete":
    meta.unlink()
  else:
    meta.write_bytes(b"\x84\xff\x00" if damage == "binary" else b"[1, 2]")
  with pytest.raises(ValueError, match=f"'{meta}' is (missing|damaged)"):
    trainer.train_and_evaluate(cfg, tc, ds, tmp_path / "run", resume=True, verbose=False)


def test_a_damaged_training_checkpoint_is_named_with_its_path(tmp_path):
  ds, cfg, tc = _tiny_run(tmp_path)
  trainer.train_and_evaluate(cfg, tc, ds, tmp_path / "run", verbose=False)
  (meta,) = (tmp_path / "run" / "ckpt" / "1").glob("meta/metadata")
  meta.write_bytes(b"\x84\xff\x00")
  step = tmp_path / "run" / "ckpt" / "1"
  with pytest.raises(ValueError, match=f"cannot read training checkpoint '{step}'"):
    trainer.train_and_evaluate(cfg, tc, ds, tmp_path / "run", resume=True, verbose=False)


def test_the_initial_validation_is_printed(tmp_path, capsys):
  ds, cfg, tc = _tiny_run(tmp_path)
  trainer.train_and_evaluate(cfg, tc, ds, tmp_path / "run", verbose=True)
  first = trainer.read_metrics(tmp_path / "run")[0]
  assert first["epoch"] == -1
  assert f"initial val MSE {first['val_mse']:.5g}\n" in capsys.readouterr().out
