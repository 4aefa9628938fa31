"""Training step, loss, optimiser and dead-codeword reset (spec section 9).

Pure functions: `make_train_step(...)` returns the jitted
`train_step(state, batch) -> (state, metrics)`. The batch is sharded along the
("data",) mesh axis and the state replicated, so `jax.jit` runs it data-parallel over
every device (the gradient mean becomes an all-reduce); nothing here is per-device.
The epoch loop, validation and checkpoints live in `trainer.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from qinco_jax.decode import decode_steps, normalize
from qinco_jax.encode import beam_search, pre_predict

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Training recipe (defaults: the QINCo2 recipe of spec 9-10)."""

  lr: float = 8e-4  # peak learning rate
  weight_decay: float = 0.1  # decoupled (AdamW), on every parameter
  grad_clip: float | None = 0.1  # element-wise value clip; None or 0 = off
  optimizer: Literal["adamw", "adam"] = "adamw"  # "adam": the qinco1 recipe (lr 1e-4, no decay)
  schedule: Literal["cosine", "plateau"] = "cosine"  # warm-up + quarter cosine; "plateau": qinco1
  warmup_epochs: float = 3.0
  # Epochs trained, warm-up included (fewer if early stopping ends the run): the
  # spec's 3 + 60 by default. The reference then runs 8 more epochs at lr ~ 0 (71 in
  # all, spec 9.6): `epochs=71, cosine_epochs=60` reproduces that.
  epochs: int = 63
  # Length of the quarter cosine after the warm-up, in epochs; None: it ends with the
  # last epoch. The warm-up takes at most half of `epochs` (as under a time budget),
  # so a run shorter than two warm-ups still anneals.
  cosine_epochs: float | None = None
  lr_min_fact: float = 1e-3  # lr floor = lr * lr_min_fact (8e-7 by default)
  stop_patience: int = 10  # stop after more than this many epochs without improvement
  plateau_patience: int = 10  # "plateau" schedule: epochs before lr *= 0.1
  batch_per_device: int = 1024  # global batch = batch_per_device * devices
  loop: int = 10_000_000  # samples per epoch (an epoch is the whole set if smaller)
  reset_dead_codes: bool = True  # spec 9.7 (QINCo2 recipe)
  seed: int = 0
  log_every: int = 50  # steps between metric reads (each read syncs the host)
  # Gradient accumulation: one optimiser update every `accumulate` batches, with
  # their mean gradient (optax.MultiSteps), exactly as one batch `accumulate` times
  # larger. Epochs, plans and `log_every` count batches.
  accumulate: int = 1
  # Wall-time budget in seconds for the whole train_and_evaluate call (None = off).
  # The warm-up stays in epochs; the quarter cosine is planned in steps so that it
  # ends when the budget does, and re-planned after every epoch from the measured
  # time per step (validation included). The budget (or early stopping) then ends
  # the run: `epochs` only seeds the first plan.
  time_budget_s: float | None = None

  def __post_init__(self):
    if self.optimizer not in ("adamw", "adam"):
      raise ValueError(f"optimizer must be 'adamw' or 'adam', got {self.optimizer!r}")
    if self.schedule not in ("cosine", "plateau"):
      raise ValueError(f"schedule must be 'cosine' or 'plateau', got {self.schedule!r}")
    for name in ("lr", "batch_per_device", "loop", "epochs", "accumulate", "log_every"):
      if not getattr(self, name) > 0:  # also refuses NaN
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
    for name in ("lr", "weight_decay", "warmup_epochs", "lr_min_fact", "grad_clip",
                 "cosine_epochs", "time_budget_s"):
      v = getattr(self, name)
      if v is not None and not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    for name in ("weight_decay", "warmup_epochs", "lr_min_fact"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
    if self.grad_clip is not None and self.grad_clip < 0:
      raise ValueError(f"grad_clip must be >= 0 (0 or None: off), got {self.grad_clip!r}")
    if self.stop_patience < 0:
      raise ValueError(f"stop_patience must be >= 0 (epochs without improvement before "
                       f"training stops; a large value turns early stopping off), got "
                       f"{self.stop_patience!r}")
    if self.plateau_patience < 1:
      raise ValueError(f"plateau_patience must be >= 1, got {self.plateau_patience!r}")
    if self.cosine_epochs is not None and not self.cosine_epochs > 0:
      raise ValueError(f"cosine_epochs must be > 0 or None, got {self.cosine_epochs!r}")

    if self.time_budget_s is not None:
      if not self.time_budget_s > 0:
        raise ValueError(f"time_budget_s must be > 0 seconds, got {self.time_budget_s!r}")
      if self.schedule != "cosine":
        raise ValueError("time_budget_s needs the 'cosine' schedule, got "
                         f"{self.schedule!r}")

  @property
  def warmup_length(self) -> float:
    """Warm-up epochs used: `warmup_epochs`, at most half of `epochs`."""
    return min(self.warmup_epochs, self.epochs / 2)

  @property
  def cosine_length(self) -> float:
    """Epochs of the quarter cosine after the warm-up."""
    if self.cosine_epochs is not None:
      return self.cosine_epochs
    return self.epochs - self.warmup_length

  def replace(self, **kw) -> TrainConfig:
    return dataclasses.replace(self, **kw)


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "qinco1": dict(lr=1e-4, weight_decay=0.0, grad_clip=None, optimizer="adam",
                   schedule="plateau", stop_patience=20, reset_dead_codes=False),
}


def train_preset(model_preset: str, **overrides) -> TrainConfig:
  """The training recipe that goes with a model preset (qinco1 has its own)."""
  return TrainConfig(**{**TRAIN_PRESETS.get(model_preset.lower(), {}), **overrides})


def lr_factor(t, cfg: TrainConfig, cosine_epochs: float | None = None, xp=jnp,
              warmup_epochs: float | None = None):
  """lambda(t) of spec 9.5 at fractional epoch t: warm-up then quarter cosine.

  cosine_epochs: length of the quarter cosine (default cfg.cosine_length). warmup_epochs:
  length of the warm-up (default cfg.warmup_length). xp: jnp (traced, inside the
  optimiser) or np (host floats, for the time-budget schedule).
  """
  w = cfg.warmup_length if warmup_epochs is None else warmup_epochs
  length = cfg.cosine_length if cosine_epochs is None else cosine_epochs
  warm = xp.minimum(t / w, 1.0) if w > 0 else xp.ones_like(t)
  cos = xp.cos(xp.minimum((t - w) / length, 1.0) * xp.pi / 2)
  return xp.maximum(xp.where(t < w, warm, cos), cfg.lr_min_fact)


def budget_lr(step: int, steps_per_epoch: int, plan_steps: int, cfg: TrainConfig) -> float:
  """Learning rate of update `step` (0-based) under a time budget: `lr_factor` with
  the quarter cosine ending at update `plan_steps`.

  The warm-up takes at most half of the plan, so a budget shorter than two warm-ups
  still anneals to the floor (with the whole warm-up it would stop with the lr rising).
  """
  plan = plan_steps / steps_per_epoch
  warm = min(cfg.warmup_epochs, plan / 2)
  length = max(plan - warm, 1 / steps_per_epoch)
  t = np.float64((step + 1) / steps_per_epoch)
  return cfg.lr * float(lr_factor(t, cfg, cosine_epochs=length, xp=np, warmup_epochs=warm))


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
  """Element-wise clip, then Adam(W) with the lr schedule (a hyperparameter in state).

  With cfg.time_budget_s the lr is a plain hyperparameter that the trainer sets
  before every update (`budget_lr`).
  """
  updates_per_epoch = steps_per_epoch / cfg.accumulate
  lr: float | Callable[[Any], Any]  # a schedule, or a value the trainer updates
  if cfg.schedule == "cosine" and cfg.time_budget_s is None:
    def lr(count):  # count = updates done so far; t is updated before each batch
      return cfg.lr * lr_factor((count + 1) / updates_per_epoch, cfg)
  else:
    lr = cfg.lr  # "plateau" or time budget: the trainer sets it
  if cfg.optimizer == "adamw":
    opt = optax.inject_hyperparams(optax.adamw)(
        learning_rate=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)
  else:
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=lr, b1=0.9, b2=0.999,
                                               eps=1e-8)
  parts = [optax.clip(cfg.grad_clip)] if cfg.grad_clip else []
  tx = optax.chain(*parts, opt)
  if cfg.accumulate > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulate)
  return tx


def hyperparams(opt_state) -> dict:
  """The injected hyperparameters (learning_rate, ...) of a `make_optimizer` state; a
  mutable dict (the trainer sets the lr of a time budget through it)."""
  if isinstance(opt_state, optax.MultiStepsState):
    opt_state = opt_state.inner_opt_state
  return opt_state[-1].hyperparams


def current_lr(opt_state) -> Array:
  return hyperparams(opt_state)["learning_rate"]


class TrainState(NamedTuple):
  params: nnx.State  # trainable (nnx.Param)
  rest: nnx.State  # data normalisation and running target statistics
  opt: Any  # optax state
  usage: Array  # (M, K) int32 code histogram of the current epoch
  step: Array  # () int32 updates done


def init_state(graphdef, state: nnx.State, tx: optax.GradientTransformation,
               ) -> TrainState:
  # Fresh buffers: train_step donates its state, which must not delete the codec's.
  params, rest = jax.tree.map(jnp.copy, state).split(nnx.Param, ...)
  model = nnx.merge(graphdef, state)
  usage = jnp.zeros((model.cfg.M, model.cfg.K), jnp.int32)  # QINCo steps, not IVF
  return TrainState(params, rest, tx.init(params), usage, jnp.zeros((), jnp.int32))


def loss_fn(params, rest, graphdef, x: Array, A: int, B: int):
  """Spec 9.1. x: (N, D) normalised. Returns (loss, aux): the beam search of the whole
  batch (`beam_search`, frozen parameters), then `decode_loss`."""
  frozen = nnx.merge(graphdef, jax.lax.stop_gradient(params), rest)
  enc = beam_search(frozen, x, A=A, B=B, with_stats=True)
  loss, (step_mse, pre_loss) = decode_loss(params, rest, graphdef, x, enc.codes, A)
  return loss, (enc.codes, enc.target_mean, enc.target_std, step_mse, pre_loss)


def decode_loss(params, rest, graphdef, x: Array, codes: Array, A: int):
  """The loss of given codes (spec 9.1): the sum over steps of the decoder's MSE plus,
  with pre-selection (A > 0), the pre-selection loss. x: (N, D) normalised; codes:
  (N, M_tot) int32 (no gradient). Returns (loss, (step_mse (M_tot,), pre_loss))."""
  model = nnx.merge(graphdef, params, rest)
  _, partials = decode_steps(model, codes)  # (M_tot, N, D), with gradient
  step_mse = jnp.mean((partials - x[None]) ** 2, axis=(1, 2))  # (M_tot,)
  loss = jnp.sum(step_mse[model.cfg.n_ivf:])  # the frozen IVF step has no loss
  pre_loss = jnp.zeros(())
  if A > 0 and model.pre_codebooks is not None:
    entering = jax.lax.stop_gradient(partials[:-1])  # (S, N, D) entering each net step
    idx = codes[:, 1:].T  # (S, N)
    Cp = jnp.take_along_axis(model.pre_codebooks[...], idx[:, :, None], axis=1)
    if model.pre_steps is not None:
      g_def, g_state = nnx.split(model.pre_steps)
      g = jax.vmap(lambda s, c, xh: pre_predict(nnx.merge(g_def, s), c[:, None], xh)[:, 0]
                   )(g_state, Cp, entering)
    else:
      g = Cp  # Ls = 0: pre_predict is the codeword itself
    pre_loss = jnp.sum(jnp.mean((entering + g - x[None]) ** 2, axis=(1, 2)))
  return loss + pre_loss, (step_mse, pre_loss)


def encode_batch(model, x: Array, A: int, B: int, chunk: int | None = None,
                 axis: str | None = None) -> tuple[Array, Array, Array]:
  """The training step's beam search: (codes (N, M_tot) int32, target_mean (S, D),
  target_std (S, D)), as `beam_search(..., with_stats=True)` over the whole batch.

  chunk: vectors per beam-search call (`lax.map` over groups of rows; default: all
  N at once): the candidates' activations then stay small (on a TPU, on chip; the
  pod compiles showed the whole-batch search bound by memory traffic). axis: inside
  `shard_map`, the mesh axis the batch is split over: the statistics are combined
  over every device's rows. Chunks and devices are combined exactly (Chan's pairwise
  mean and M2), so the statistics are those of the whole batch.
  """
  n, d = x.shape
  c = n if not chunk or chunk >= n else chunk
  n_chunks, rest = divmod(n, c)
  if rest:  # the last call takes the c + rest last rows (fewer than 2c; never a
    n_chunks -= 1  # call of a few rows, whose statistics' count floor would show)
  m = n_chunks * c
  parts = []  # (codes, target counts, means, stds) of each group of calls
  if n_chunks:
    # Group j holds rows j, j + n_chunks, ...: a strided split keeps each group on
    # every device when the batch itself is split (no row moves).
    xr = x[:m].reshape(c, n_chunks, d).swapaxes(0, 1)  # (n_chunks, c, D)
    res = jax.lax.map(lambda xc: beam_search(model, xc, A=A, B=B, with_stats=True), xr)
    parts.append((res.codes.swapaxes(0, 1).reshape(m, -1), res.target_count,
                  res.target_mean, res.target_std))
  if m < n:
    last = beam_search(model, x[m:], A=A, B=B, with_stats=True)
    assert last.target_count is not None  # with_stats=True
    assert last.target_mean is not None and last.target_std is not None
    parts.append((last.codes, last.target_count[None], last.target_mean[None],
                  last.target_std[None]))
  codes, counts, means, stds = (jnp.concatenate(p) for p in zip(*parts))
  cnt = counts[:, :, None]  # (chunks, S, 1)
  total = jnp.sum(cnt, axis=0)  # (S, 1)
  s1 = jnp.sum(cnt * means, axis=0)  # (S, D)
  if axis is not None:
    total, s1 = jax.lax.psum((total, s1), axis)
  mean = s1 / total
  m2 = jnp.sum((cnt - 1) * stds ** 2 + cnt * (means - mean[None]) ** 2, axis=0)
  if axis is not None:
    m2 = jax.lax.psum(m2, axis)
  return codes, mean, jnp.sqrt(m2 / (total - 1))


def make_train_step(graphdef, tx: optax.GradientTransformation, A: int, B: int,
                    momentum: float = 0.1, *, mesh: jax.sharding.Mesh | None = None,
                    chunk: int | None = None):
  """Builds the jitted `train_step(state, batch) -> (state, metrics)`.

  batch: (N, D) float32 raw vectors, sharded along the data axis.
  mesh: the ("data",) mesh the batch is split over (`trainer.data_mesh`): the beam
    search then runs on each device's own rows (`shard_map`), with no collective but
    its statistics' sums (left to the compiler, the CPU backend gathers the whole
    batch for every top-k). None: the compiler partitions it.
  chunk: vectors per device per beam-search call (`encode_batch`); None: the whole
    batch of the device at once.
  The decoder's loss and its gradient (`decode_loss`) are data parallel as usual: the
  compiler sums the devices' gradients.
  """
  def encode(params, rest, x):
    frozen = nnx.merge(graphdef, jax.lax.stop_gradient(params), rest)
    if mesh is None:
      return encode_batch(frozen, x, A, B, chunk)

    def local(p, r, xs):
      return encode_batch(nnx.merge(graphdef, p, r), xs, A, B, chunk, axis="data")
    # check_vma off: the beam search's loop state starts replicated (constants) and
    # becomes per-device, which the varying-axes check would refuse.
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data")),
                         out_specs=(P("data"), P(), P()), check_vma=False)(params, rest, x)

  def train_step(state: TrainState, batch: Array):
    model = nnx.merge(graphdef, state.params, state.rest)
    x = normalize(model, batch)
    codes, t_mean, t_std = encode(state.params, state.rest, x)
    (loss, (step_mse, pre_loss)), grads = jax.value_and_grad(decode_loss, has_aux=True)(
        state.params, state.rest, graphdef, x, codes, A)
    updates, opt = tx.update(grads, state.opt, state.params)
    params = optax.apply_updates(state.params, updates)
    # Running target statistics (9.8): EMA with momentum 0.1 over the global batch.
    model.xtarget_mean[...] = (1 - momentum) * model.xtarget_mean[...] + momentum * t_mean
    model.xtarget_std[...] = (1 - momentum) * model.xtarget_std[...] + momentum * t_std
    rest = nnx.state(model, nnx.Not(nnx.Param))
    Kc = state.usage.shape[1]
    qcodes = codes[:, model.cfg.n_ivf:]  # (N, M) QINCo codes
    usage = state.usage + jax.vmap(lambda c: jnp.bincount(c, length=Kc))(qcodes.T)
    metrics = {"loss": loss, "mse": step_mse[-1], "pre_loss": pre_loss,
               "lr": current_lr(opt)}
    return TrainState(params, rest, opt, usage.astype(jnp.int32), state.step + 1), metrics

  return jax.jit(train_step, donate_argnums=(0,))


@functools.partial(jax.jit, static_argnames=("code_scale", "pre_scale"))
def _reset_rows(params, rest, usage, key, noise: float, code_scale: float = 1.0,
                pre_scale: float = 1.0):
  """Spec 9.7: replace never-used codewords by random vectors at the target statistics.

  usage: (M, K), one row per QINCo step (the IVF step, if any, is never reset).
  code_scale, pre_scale: how network steps store a codeword in C_m and C'_m
  (`QincoConfig.codeword_scale`: 0.5 for the "rq" init with E = D, where f = 2c at
  initialisation), so that a reset row decodes to the drawn vector as at creation.
  """
  M, K = usage.shape
  # Target statistics of the QINCo steps (the last M of the M_tot rows).
  mean, std = rest["xtarget_mean"][...][-M:], rest["xtarget_std"][...][-M:]  # (M, D)
  D = mean.shape[-1]
  k_u, k_n = jax.random.split(key)
  u = jax.random.uniform(k_u, (M, K, D))
  u = (u - u.mean(axis=(1, 2), keepdims=True)) / u.std(axis=(1, 2), keepdims=True)
  new = u * std[:, None, :] + mean[:, None, :]  # (M, K, D)
  dead = (usage == 0)[:, :, None]  # (M, K, 1)
  net = 0  # first usage row that belongs to a network step
  if "codebook0" in params:
    params["codebook0"][...] = jnp.where(dead[0], new[0], params["codebook0"][...])
    net = 1
  if M > net:
    dead_n, new_n = dead[net:], new[net:]
    params["codebooks"][...] = jnp.where(dead_n, new_n * code_scale,
                                         params["codebooks"][...])
    if "pre_codebooks" in params:
      pre_new = new_n + (jax.random.normal(k_n, new_n.shape)
                         * new_n.std(axis=(1, 2), keepdims=True) * noise / 4)
      params["pre_codebooks"][...] = jnp.where(dead_n, pre_new * pre_scale,
                                               params["pre_codebooks"][...])
  return params, jnp.sum(usage == 0, axis=1)


def reset_dead_codes(state: TrainState, key: Array, noise: float,
                     code_scale: float = 1.0, pre_scale: float = 1.0):
  """Returns (state with dead codewords reset and usage zeroed, resets per step).

  code_scale, pre_scale: see `_reset_rows` (`reset_scales(cfg, d)` gives them)."""
  params, n_reset = _reset_rows(state.params, state.rest, state.usage, key, noise,
                                code_scale=float(code_scale), pre_scale=float(pre_scale))
  return state._replace(params=params, usage=jnp.zeros_like(state.usage)), n_reset


def reset_scales(cfg, d: int) -> tuple[float, float]:
  """(code_scale, pre_scale) of `reset_dead_codes` for a model config and dimension d:
  how its network steps store codewords in C_m and C'_m (as `Codec.create` does)."""
  scale = cfg.codeword_scale(d)
  return scale, (scale if cfg.Ls > 0 else 1.0)
