"""Ahead-of-time compiles of the programs a run executes, for a target it does not have.

Nothing here is a copy: the training step is `trainer.make_step` (the trainer's
`train.make_train_step`) on the mesh of `trainer.data_mesh` with `trainer.shardings`;
the encoder and decoder are `codec.encode_chunk` and `codec.decode_chunk` on
`codec.local_mesh` of one host, at the chunk `Codec.chunk_size` gives that host. Only
the inputs are abstract (`jax.ShapeDtypeStruct`s carrying the shardings the run gives
its arrays), so the compiler sees exactly the program a pod or GPU host would run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qinco_jax import codec as codec_mod
from qinco_jax import flops, train, trainer
from qinco_jax.aot import hlo
from qinco_jax.aot.targets import Target
from qinco_jax.config import QincoConfig
from qinco_jax.model import abstract_model

# JAX's GPU client takes this share of a GPU's memory for its buffers by default
# (XLA_PYTHON_CLIENT_MEM_FRACTION); a TPU program may use the chip's whole HBM (the
# TPU compiler itself refuses a program that does not fit).
GPU_MEMORY_FRACTION = 0.75


@dataclasses.dataclass
class Program:
  """One compiled program on one target, per chip (device)."""

  name: str
  rows: int  # samples (training) or vectors (encode, decode) per chip per call
  fits: bool
  memory: dict[str, int]  # argument, output, alias, temp, code, total bytes per chip
  usable_bytes: int  # what a program may use on this chip
  analytic_flops: float  # per chip per call, the FLOP model (qinco_jax.flops)
  stats: hlo.HloStats | None
  xla_flops: float | None  # XLA's cost analysis (loop bodies counted once)
  xla_seconds: float | None  # XLA's TPU cost model ("optimal_seconds"), if any
  compile_s: float
  error: str = ""  # why it does not fit, when the compiler says so
  recompiles: bool | None = None  # training: the next step would not reuse this one

  @property
  def hlo_flops(self) -> float | None:
    return None if self.stats is None else self.stats.matmul_flops


def _sds(tree, sharding):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                      tree)


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
         "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
         "code": m.generated_code_size_in_bytes}
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["code"]
  return out


def usable_bytes(target: Target) -> int:
  frac = GPU_MEMORY_FRACTION if target.chip.platform == "gpu" else 1.0
  return int(target.chip.hbm_bytes * frac)


def _cost(compiled) -> tuple[float | None, float | None]:
  try:
    c = compiled.cost_analysis()
  except Exception:  # some backends raise instead of returning None
    return None, None
  if isinstance(c, list):  # older jax: one dict per program
    c = c[0] if c else None
  if not c:
    return None, None
  return c.get("flops"), c.get("optimal_seconds")


def _is_oom(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def _compile(name: str, rows: int, target: Target, lower: Callable[[], Any],
             analytic: float, check_state=None, global_batch: int = 0) -> Program:
  t = time.perf_counter()
  usable = usable_bytes(target)
  lowered = lower()
  try:
    compiled = lowered.compile()
  except Exception as e:  # the TPU compiler refuses a program larger than HBM
    if not _is_oom(e):
      raise
    first = str(e).strip().splitlines()[0][:300]
    return Program(name, rows, False, {}, usable, analytic, None, None, None,
                   time.perf_counter() - t, error=first)
  mem = _memory(compiled)
  xla_flops, xla_s = _cost(compiled)
  stats = hlo.analyse(compiled.as_text(), global_batch)
  recompiles = None if check_state is None else check_state(lowered)
  return Program(name, rows, mem["total"] <= usable, mem, usable, analytic, stats,
                 xla_flops, xla_s, time.perf_counter() - t, recompiles=recompiles)


# ----------------------------------------------------------------------- training
def _same_avals(a, b) -> bool:
  def key(x):
    return (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)))
  ka, kb = jax.tree.map(key, a), jax.tree.map(key, b)
  same_tree = str(jax.tree.structure(a)) == str(jax.tree.structure(b))
  return same_tree and jax.tree.leaves(ka) == jax.tree.leaves(kb)


def train_step(cfg: QincoConfig, tc: train.TrainConfig, d: int, target: Target,
               devices: list, batch_per_chip: int) -> Program:
  """The training step at a global batch of batch_per_chip x chips, data parallel over
  every chip of the target (all hosts, all slices), as `trainer.train_and_evaluate`
  builds it."""
  mesh = trainer.data_mesh(devices)
  replicated, batch_sharding = trainer.shardings(mesh)
  G = batch_per_chip * len(devices)
  steps = max(1, tc.loop // G)
  tx = train.make_optimizer(tc, steps)
  graphdef, state = nnx.split(abstract_model(cfg, d))
  st = _sds(jax.eval_shape(lambda s: train.init_state(graphdef, s, tx), state), replicated)
  batch = jax.ShapeDtypeStruct((G, d), jnp.float32, sharding=batch_sharding)
  c = codec_mod.Codec(cfg, d, state)
  step_fn = trainer.make_step(c, tx, mesh, platform=target.chip.platform)
  chunk = c.chunk_size(cfg.A, cfg.B, platform=target.chip.platform, devices=1)

  def next_step_differs(lowered) -> bool:
    # The state a step returns is the next step's input: a change of shape, dtype or
    # weak type would make jit compile again at every step.
    return not _same_avals(lowered.out_info[0], st)

  return _compile(f"train step (A={cfg.A}, B={cfg.B})", batch_per_chip, target,
                  lambda: step_fn.lower(st, batch),
                  flops.train_flops(cfg, d, batch_per_chip, chunk) * batch_per_chip,
                  check_state=next_step_differs, global_batch=G)


def max_batch(compile_at: Callable[[int], Program], start: int, multiple: int = 8,
              cap: int = 64, tolerance: float = 0.10,
              known: tuple[Program, ...] = ()) -> tuple[int, list[Program]]:
  """The largest batch per chip that fits, found by compiling `compile_at(b)`.

  From `start` (halved until it fits) and twice that, a linear model of the memory
  predicts the largest batch; it is compiled, then, while everything fits, the batch
  at least doubles (to the linear model's prediction where it is larger), and once a
  batch fails the search bisects between the largest batch that fitted and the
  smallest that did not to within `tolerance`; up to `cap` x start (the answer is
  then "at least that"). Batches are multiples of `multiple`; `known`: programs compiled already
  (not compiled again). Returns (batch, programs compiled); batch 0 when not even
  `multiple` fits.
  """
  seen: list[Program] = list(known)
  limit = cap * start

  def at(b: int) -> Program:
    done = [q for q in seen if q.rows == b]
    if done:
      return done[0]
    p = compile_at(b)
    seen.append(p)
    return p

  def round_down(b: float) -> int:
    return max(multiple, int(b) // multiple * multiple)

  a = start
  pa = at(a)
  while not pa.fits and a > multiple:  # shrink until one fits
    a = round_down(a / 2)
    pa = at(a)
  if not pa.fits:
    return 0, seen
  lo, hi = a, None
  pb = at(2 * a)
  if pb.fits:
    lo = 2 * a
  else:
    hi = 2 * a

  def linear_guess() -> float | None:
    """Where the memory of the two largest fitting batches, extended linearly, meets
    the chip's usable bytes (None where it does not grow with the batch)."""
    fit = sorted((q for q in seen if q.fits and q.memory), key=lambda q: q.rows)[-2:]
    if len(fit) < 2 or fit[1].memory["total"] <= fit[0].memory["total"]:
      return None
    per_row = (fit[1].memory["total"] - fit[0].memory["total"]) / (fit[1].rows - fit[0].rows)
    return fit[1].rows + (fit[1].usable_bytes - fit[1].memory["total"]) / per_row

  model = linear_guess() if hi is None else None
  from_model = model is not None
  guess: float = model if model is not None else (2 * lo if hi is None else (lo + hi) / 2)
  while lo < limit:  # at most log2(cap) doublings, then a bisection to `tolerance`
    g = min(round_down(guess), limit, (hi - multiple) if hi is not None else limit)
    if g <= lo:
      break
    if at(g).fits:
      lo = g
    else:
      hi = g
    if hi is not None and hi - lo <= max(multiple, tolerance * lo):
      break
    if hi is not None:
      guess, from_model = (lo + hi) / 2, False
    elif from_model:  # the model's prediction fits: the limit should be just above
      guess, from_model = lo * (1 + tolerance), False
    else:  # no failure yet and no model to trust (the memory need not grow linearly: a
      # GPU compile used less at 2,048 rows than at 1,024): double, or follow the model
      lin = linear_guess()
      from_model = lin is not None and lin > 2 * lo
      guess = lin if lin is not None and lin > 2 * lo else 2 * lo
  return lo, seen


# ----------------------------------------------------------------------- codec
def _host_devices(devices: list) -> list:
  """The devices of the first host (process 0): what one encoding process splits its
  chunks over."""
  first = min(d.process_index for d in devices)
  return [d for d in devices if d.process_index == first]


def encoder(cfg: QincoConfig, d: int, target: Target, devices: list, A: int,
            B: int) -> Program:
  """`codec.encode_chunk` at beam (A, B) on one host's chips, at the chunk
  `Codec.chunk_size` gives that host."""
  host = _host_devices(devices)
  graphdef, state = nnx.split(abstract_model(cfg, d))
  c = codec_mod.Codec(cfg, d, state)
  chunk = c.chunk_size(A, B, platform=target.chip.platform, devices=len(host))
  mesh = codec_mod.local_mesh(host)
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  st = _sds(state, rep)
  x = jax.ShapeDtypeStruct((chunk, d), jnp.float32, sharding=split)
  per_chip = chunk // len(host)
  return _compile(f"encode (A={A}, B={B})", per_chip, target,
                  lambda: codec_mod.encode_chunk.lower(graphdef, st, x, A=A, B=B),
                  flops.encode_flops(cfg, d, A, B, per_chip) * per_chip)


def decoder(cfg: QincoConfig, d: int, target: Target, devices: list) -> Program:
  """`codec.decode_chunk` on one host's chips at `codec.DECODE_CHUNK` vectors per call."""
  host = _host_devices(devices)
  graphdef, state = nnx.split(abstract_model(cfg, d))
  chunk = -(-codec_mod.DECODE_CHUNK // len(host)) * len(host)
  mesh = codec_mod.local_mesh(host)
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  st = _sds(state, rep)
  codes = jax.ShapeDtypeStruct((chunk, cfg.M_tot), jnp.int32, sharding=split)
  per_chip = chunk // len(host)
  return _compile("decode", per_chip, target,
                  lambda: codec_mod.decode_chunk.lower(graphdef, st, codes),
                  flops.decode_flops(cfg, d, per_chip) * per_chip)


def param_bytes(cfg: QincoConfig, d: int) -> int:
  """Bytes of the trainable parameters (what the gradient all-reduce moves)."""
  params = nnx.split(abstract_model(cfg, d), nnx.Param, ...)[1]
  return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize
                 for a in jax.tree.leaves(params)))
