"""Shared by the benchmarks: flags generated from a benchmark's config dataclass, the
FLOP model of the step networks, the timing harness (wall times that wait for JAX,
matmul peak, adaptive repeat counts), the training-step throughput and writing a
benchmark's own section of docs/benchmarks.md. The benchmark modules import this one,
never each other."""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

import qinco_jax as qj
from qinco_jax import data, experiment, train, trainer
from qinco_jax.config import parse_config
from qinco_jax.configs import glove_small
from qinco_jax.data import atomic_write
from qinco_jax.flops import (  # noqa: F401  (the benchmarks' FLOP model, re-exported)
    candidate_flops,
    decode_flops,
    encode_flops,
    tail_flops,
    train_flops,
)

LONG_CALL = 4  # a call this many times over the target time is not repeated
# Default outputs, relative to the directory the benchmark runs in (a clone's root):
DOC = os.path.join("docs", "benchmarks.md")  # the benchmarks' document
RUNS = "runs"  # work directories

C = TypeVar("C")
T = TypeVar("T")


# ------------------------------------------------------------------ flags -> config
def command_line(script: str, argv: Sequence[str]) -> str:
  """The command as a user types it: `python experiments/NAME.py FLAGS`."""
  return " ".join(["python", f"experiments/{os.path.basename(script)}",
                   shlex.join(list(argv))]).strip()


def script_main(cls: type[C], run: Callable[[C, str], object], script: str,
                description: str, argv: Sequence[str] | None = None) -> None:
  """The body of an `experiments/bench_*.py` script: flags -> config -> one call."""
  argv = sys.argv[1:] if argv is None else list(argv)
  run(parse_config(cls, argv, description), command_line(script, argv))


def glove_small_recipe(model: dict[str, Any], train: dict[str, Any],
                       loop: int) -> tuple[qj.QincoConfig, train.TrainConfig]:
  """The README's main job's config file (`configs/glove_small`) with overrides: the
  `model` and `train` fields given (None: the dataclass's default, e.g. `epochs=None`
  for TrainConfig's), one epoch = `loop` samples. The benchmarks that train for a
  budget start from it, so a recipe is a config file plus what the benchmark varies."""
  c = glove_small.get_config()
  c.model.update(**model)
  c.train.update(**train)
  c.ds.loop = loop
  return experiment.model_config(c, 0), experiment.train_config(c)


# What a training run leaves in its workdir (trainer.train_and_evaluate, its lock and
# atomic writes start with "."): a folder holding only these is an earlier attempt.
RUN_FILES = frozenset({"best", "ckpt", "ckpt_meta.json", "metrics.jsonl", "tb"})


def clear_run_dir(path: str) -> None:
  """Removes `path`, a benchmark's own run folder left by an earlier attempt, so that a
  run starts afresh (the trainer refuses to overwrite a checkpoint). A folder holding
  anything a training run does not write is refused (ValueError naming it), never
  deleted: it may be the user's."""
  if not os.path.isdir(path):
    return
  foreign = sorted(n for n in os.listdir(path) if n not in RUN_FILES and n[0] != ".")
  if foreign:
    raise ValueError(f"{path} holds files a training run does not write ({foreign[:5]}): "
                     "it is not an earlier run of this benchmark, so it is left as it is; "
                     "move it or choose another --workdir")
  shutil.rmtree(path)


@dataclasses.dataclass
class Training:
  """A fresh training run (`fresh_training`): the best codec, wall and CPU seconds,
  the epoch records of metrics.jsonl and every validation MSE (the initial model's
  first)."""
  codec: qj.Codec
  train_s: float
  cpu_s: float
  epochs: list[dict[str, Any]]
  val: list[float]

  @property
  def samples(self) -> int:
    return sum(r["samples"] for r in self.epochs)


def fresh_training(cfg: qj.QincoConfig, tc: train.TrainConfig, ds: data.Dataset,
                   workdir: str, verbose: bool = False) -> Training:
  """`trainer.train_and_evaluate` from scratch in the benchmark's run folder `workdir`
  (an earlier attempt there is removed first, `clear_run_dir`), timed."""
  clear_run_dir(workdir)
  w0, c0 = time.perf_counter(), time.process_time()
  codec = trainer.train_and_evaluate(cfg, tc, ds, workdir, verbose=verbose)
  train_s, cpu_s = time.perf_counter() - w0, time.process_time() - c0
  recs = trainer.read_metrics(workdir)
  return Training(codec, train_s, cpu_s, [r for r in recs if "train_s" in r],
                  [r["val_mse"] for r in recs if "val_mse" in r])


def write_section(path: str, block: str, start: str, end: str) -> None:
  """Replaces the text from marker `start` to marker `end` (inclusive) in `path` with
  `block` (which carries the markers), appends it when absent, or creates the file;
  the rest of the document is kept and the file is written atomically."""
  block = block.strip("\n")
  text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
  i, j = text.find(start), text.find(end)
  if i >= 0 and j > i:
    text = text[:i] + block + text[j + len(end):]
  else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic_write(path, lambda f: f.write(text.encode()))


# ------------------------------------------------------------------ timing
_T0 = time.perf_counter()


def log(msg: str):
  """Progress line with the seconds elapsed since start."""
  print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


def timed(fn: Callable[[], object]) -> float:
  """Wall time of fn() in seconds, waiting for any JAX result."""
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def median_time(fn: Callable[[], object], repeats: int) -> float:
  """Median wall time of `repeats` calls of fn, after one warm-up call."""
  timed(fn)
  return statistics.median(timed(fn) for _ in range(repeats))


def page_faults(fn: Callable[[], object]) -> int | None:
  """Minor page faults (fresh memory touched) of this process during fn()."""
  try:
    import resource
  except ImportError:  # not on this platform
    return None
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(fn())
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def interleaved_times(fns: Mapping[str, Callable[[], object]],
                      repeats: int) -> dict[str, float]:
  """Median wall time of each fn, timed round-robin so that load changes hit all."""
  for fn in fns.values():
    timed(fn)  # compile + warm-up
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      times[k].append(timed(fn))
  return {k: statistics.median(v) for k, v in times.items()}


def matmul_peak(n: int, repeats: int) -> float:
  """Float32 GFLOP/s of a jitted (n, n) @ (n, n), median of `repeats` timings."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  t = median_time(lambda: dot(a, b), repeats)
  return 2 * n**3 / t / 1e9


def bracketed(fn: Callable[[], T], n: int) -> tuple[T, float]:
  """Runs fn() between two matmul-peak measurements: (fn(), mean peak GFLOP/s).

  On a shared machine the load changes over time; measuring the peak on both sides
  makes "% of peak" compare numbers taken under the same conditions.
  """
  before = matmul_peak(n, 3)
  out = fn()
  return out, 0.5 * (before + matmul_peak(n, 3))


def adaptive_rate(run_chunks: Callable[[int], object], chunk: int, target_s: float,
              max_n: int, repeats: int) -> tuple[float, int]:
  """Times run_chunks(n) on n vectors, n a multiple of chunk sized to ~target_s.

  The first call compiles; one chunk is then timed to size n. A single chunk that
  takes over LONG_CALL x target_s is timed once only. Returns (median vectors/s, n).
  """
  timed(lambda: run_chunks(chunk))  # compile + warm-up
  t1 = timed(lambda: run_chunks(chunk))
  n_chunks = int(np.clip(round(target_s / max(t1, 1e-9)), 1, max(1, max_n // chunk)))
  n = n_chunks * chunk
  times = [t1] if n_chunks == 1 else []
  if t1 > LONG_CALL * target_s:
    repeats = 1
  while len(times) < repeats:
    times.append(timed(lambda: run_chunks(n)))
  return n / statistics.median(times), n


# ------------------------------------------------------------------ training throughput
def train_throughput(cfg: qj.QincoConfig, x: np.ndarray, batch: int, steps: int,
                     warmup: int = 3) -> dict[str, Any]:
  """Times `steps` calls of the jitted training step (after `warmup` calls, which
  include compilation) on consecutive batches of the (n, d) training vectors x (cycled
  when there are fewer than warmup + steps batches), in the compute dtype cfg.dtype."""
  n_init = min(len(x), 20_000)
  codec = qj.Codec.create(cfg, x[:n_init], verbose=False)
  tc = train.TrainConfig(batch_per_device=batch, epochs=10, warmup_epochs=1)
  tx = train.make_optimizer(tc, steps_per_epoch=max(1, len(x) // batch))
  state = train.init_state(codec.graphdef, codec.state, tx)
  step_fn = trainer.make_step(codec, tx, trainer.data_mesh(jax.devices()[:1]))
  n_batches = max(1, min(len(x) // batch, warmup + steps))
  batches = [jnp.asarray(np.asarray(x[i * batch:(i + 1) * batch], np.float32))
             for i in range(n_batches)]
  for i in range(warmup):
    state, m = step_fn(state, batches[i % n_batches])
  jax.block_until_ready(m)
  w0, c0 = time.perf_counter(), time.process_time()
  for i in range(steps):
    state, m = step_fn(state, batches[(warmup + i) % n_batches])
  jax.block_until_ready((state, m))
  wall, cpu = time.perf_counter() - w0, time.process_time() - c0
  samples = steps * batch
  flops = train_flops(cfg, x.shape[1], batch)
  return {"model": f"L={cfg.L}, de={cfg.de}, dh={cfg.dh}, M={cfg.M}", "A": cfg.A,
          "dtype": cfg.dtype,
          "B": cfg.B, "batch": batch, "steps": steps, "wall_s": wall, "cpu_s": cpu,
          "samples_s": samples / wall, "samples_per_cpu_s": samples / max(cpu, 1e-9),
          "flops_per_sample": flops, "gflops": flops * samples / wall / 1e9,
          "loss": float(m["loss"])}
