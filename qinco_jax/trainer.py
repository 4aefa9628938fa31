"""The training loop: epochs, validation, dead-code reset, checkpoints, resume, logs.

Resume order (first that applies): a checkpoint in `workdir/ckpt` when `resume=True`
(an existing checkpoint with `resume=False` is an error, never overwritten) -> a fresh,
RQ-initialised codec. A fresh start never replaces the results of a run that wrote a
checkpoint (`best`, `metrics.jsonl`, `ckpt_meta.json` without `ckpt`), nor files of
those names that a training did not write: only those of a start that stopped before
its first checkpoint. Each epoch ends with validation, the dead-codeword reset, an
Orbax checkpoint of the full training state (params, optimiser, usage, step, epoch,
best validation MSE; atomic) and, when validation improved, an atomic save of the
best codec to `workdir/best` (`qj.load(workdir)` loads it). The data order is a
deterministic function of (seed, epoch), so a run killed at any point and resumed
ends where an uninterrupted run ends.

Several processes (hosts): call `qinco_jax.distributed.initialize` first; every
process runs this loop on its devices' rows of each global batch; process 0 alone
reads and writes the workdir, validates, logs and prints, and broadcasts what it
decides (docs/design.md, "Several processes").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from qinco_jax import budget, checkpoint, data, metrics, train
from qinco_jax import distributed as dist
from qinco_jax.codec import Codec, load
from qinco_jax.config import QincoConfig
from qinco_jax.model import Qinco


class BatchOrder:
  """Deterministic sample order: a fresh permutation of the training set per pass;
  epoch e covers positions [e*S, e*S + steps*G) of the concatenated passes.

  The order is a function of (n, S, G, seed) only: the global batch of every update is
  the same whatever the number of processes and devices that share it (each device
  reads the rows of its own slice, `_global_batch`).
  """

  def __init__(self, n: int, samples_per_epoch: int, global_batch: int, seed: int):
    self.n, self.S, self.G, self.seed = n, samples_per_epoch, global_batch, seed
    self._perm: tuple[int, np.ndarray | None] = (-1, None)

  def _perm_of(self, p: int) -> np.ndarray:
    if self._perm[0] != p:
      self._perm = (p, np.random.default_rng([self.seed, p]).permutation(self.n))
    perm = self._perm[1]
    assert perm is not None  # pass p >= 0 has its permutation (set above)
    return perm

  def indices(self, epoch: int, step: int) -> np.ndarray:
    pos = epoch * self.S + step * self.G + np.arange(self.G, dtype=np.int64)
    out = np.empty(self.G, np.int64)
    for p in np.unique(pos // self.n):
      sel = pos // self.n == p
      out[sel] = self._perm_of(int(p))[pos[sel] % self.n]
    return out


def data_mesh(devices=None) -> jax.sharding.Mesh:
  """The training mesh: one ("data",) axis over every device of every process.

  devices: the run's devices (default `jax.devices()`; the ahead-of-time compile passes
  a target's). On several TPU slices (devices with distinct `slice_index`) the axis is
  ordered slice by slice (`create_hybrid_device_mesh`), so that the gradient
  all-reduce runs over ICI inside each slice and crosses the data-centre network once;
  `jax.make_mesh` refuses such device sets. The axis is Auto: the compiler propagates
  the batch sharding through the beam search.
  """
  devices = list(jax.devices() if devices is None else devices)
  auto = (jax.sharding.AxisType.Auto,)
  slices = sorted({getattr(d, "slice_index", 0) or 0 for d in devices})
  if len(slices) > 1:
    from jax.experimental import mesh_utils
    per = len(devices) // len(slices)
    grid = mesh_utils.create_hybrid_device_mesh((per,), (len(slices),), devices)
    return jax.sharding.Mesh(grid.reshape(-1), ("data",), axis_types=auto)
  return jax.make_mesh((len(devices),), ("data",), devices=devices, axis_types=auto)


def shardings(mesh: jax.sharding.Mesh) -> tuple[NamedSharding, NamedSharding]:
  """(train state's, global batch's) shardings on the training mesh: the state
  replicated on every device, the batch split along "data" (data parallel)."""
  return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def make_step(codec: Codec, tx, mesh: jax.sharding.Mesh, platform: str | None = None):
  """The jitted training step the trainer runs for `codec` on `mesh`: the beam search
  on each device's own rows in the encoder's chunks (`Codec.chunk_size` per device, on
  `platform`, default this process's backend), the decoder's gradient data parallel.
  The ahead-of-time compile and the benchmarks take it from here."""
  A, B = codec.cfg.A, codec.cfg.B
  return train.make_train_step(codec.graphdef, tx, A, B, mesh=mesh,
                               chunk=codec.chunk_size(A, B, platform=platform, devices=1))


def _read_rows(x, idx: np.ndarray) -> np.ndarray:
  order = np.argsort(idx, kind="stable")
  rows = np.asarray(x[idx[order]])
  out = np.empty((len(idx), x.shape[1]), np.float32)
  try:
    out[order] = data.as_float32(rows, name="training batch")
  except ValueError:
    with np.errstate(over="ignore", invalid="ignore"):
      bad = ~np.isfinite(rows.astype(np.float32)).all(axis=1)
    if not bad.any():
      raise
    raise ValueError(f"training vector {int(idx[order][np.flatnonzero(bad)[0]])} (a row of "
                     "the training set) contains NaN or inf; clean the data") from None
  return out


def _global_batch(x, idx: np.ndarray, sharding) -> jax.Array:
  """The global batch x[idx] as one array sharded along "data"; this process reads
  only the rows of its own devices' slices (from a memory map: no host reads more)."""
  def rows(where: tuple[slice, ...] | None) -> np.ndarray:
    assert where is not None  # jax passes every device its index (typed Optional)
    return _read_rows(x, idx[where[0]])

  return jax.make_array_from_callback((len(idx), x.shape[1]), sharding, rows)


class MetricWriter:
  """JSON lines in workdir/metrics.jsonl (+ TensorBoard when tensorboardX exists)."""

  def __init__(self, workdir: Path):
    self.path = workdir / "metrics.jsonl"
    self.tb = None
    if dist.is_main():
      try:
        from tensorboardX import SummaryWriter  # optional
        self.tb = SummaryWriter(str(workdir / "tb"))
      except ImportError:
        pass

  def write(self, record: dict[str, Any]):
    """Appends one record as one whole line: a failed write (a full disk) is cut back
    to the end of the previous record, so the file never holds a torn line."""
    if not dist.is_main():
      return
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      start = os.fstat(fd).st_size
      try:
        done = 0
        while done < len(line):
          done += os.write(fd, line[done:])
      except OSError:
        os.ftruncate(fd, start)
        raise
    finally:
      os.close(fd)
    if self.tb is not None:
      step = record.get("step", 0)
      for k, v in record.items():
        if isinstance(v, (int, float)) and k != "step":
          self.tb.add_scalar(k, v, step)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file (a workdir's, or the file itself); a torn last
  line (a writer killed mid-line) is skipped."""
  path = Path(path)
  if path.is_dir():
    path = path / "metrics.jsonl"
  lines = path.read_text().splitlines()
  out = []
  for i, line in enumerate(lines):
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise ValueError(f"{str(path)!r}: line {i + 1} is not a JSON record") from None
  return out


def _save(ckpts: checkpoint.TrainCheckpoints, epoch: int, state: train.TrainState,
          meta: dict[str, Any]):
  """Process 0's checkpoint of the training state (host-local arrays)."""
  ckpts.save(epoch, dist.host(state), meta)


RUN_META = "ckpt_meta.json"  # the run's model, data dimension, recipe and data
_RESULTS = ("best", "metrics.jsonl", RUN_META)  # what a fresh start would replace


def fingerprint(x) -> str:
  """A short hash of a training set: its shape, dtype and 64 rows spread over it (the
  first and last included), read from a memory map without loading the rest. Two
  files of the same shape with other vectors differ in it (almost surely)."""
  n = len(x)
  rows = np.unique(np.linspace(0, max(n - 1, 0), min(n, 64)).astype(np.int64))
  sample = np.ascontiguousarray(np.asarray(x[rows]))
  h = hashlib.blake2b(f"{tuple(x.shape)} {sample.dtype.str}".encode(), digest_size=8)
  h.update(sample.tobytes())
  return h.hexdigest()


def _read_run_meta(workdir: Path) -> dict[str, Any]:
  """workdir/ckpt_meta.json, or a ValueError naming the file and what to do."""
  path = workdir / RUN_META
  try:
    meta = json.loads(path.read_text())
  except FileNotFoundError:
    raise ValueError(f"{str(path)!r} is missing: it records the model and data of the "
                     f"checkpoints in {str(workdir / 'ckpt')!r}, which cannot be resumed "
                     "without it. Restore it from a copy, or train in another "
                     "workdir") from None
  except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError included
    raise ValueError(f"{str(path)!r} is damaged ({type(e).__name__}: {str(e)[:200]}); "
                     "restore it from a copy, or train in another workdir") from None
  if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) or \
      not isinstance(meta.get("d"), int):
    raise ValueError(f"{str(path)!r} is damaged: expected a JSON object with the run's "
                     "'model' and 'd'; restore it from a copy, or train in another workdir")
  return meta


def _fresh_start_error(workdir: Path) -> str | None:
  """Why a fresh start may not write into `workdir` (None: it may). It would replace
  `best`, `metrics.jsonl` and `ckpt_meta.json`: allowed only when they are those of a
  start that stopped before its first checkpoint (`ckpt_meta.json` says so)."""
  present = [n for n in _RESULTS if (workdir / n).exists() or (workdir / n).is_symlink()]
  if not present:
    return None
  try:
    meta = _read_run_meta(workdir)
    QincoConfig.from_dict(meta["model"])
  except (ValueError, TypeError):
    meta = None  # not a run's record: the files are the user's
  if meta is not None and not meta.get("checkpointed", _trained_before(workdir)):
    return None
  why = ("the results of an earlier training" if meta is not None else
         "files that no training wrote here")
  return (f"{str(workdir)!r} holds {', '.join(present)} ({why}) but no checkpoint to "
          f"resume from ({str(workdir / 'ckpt')!r} is missing or empty), and a new "
          "training would replace them. Train in another workdir, or move them away "
          "first.")


def _trained_before(workdir: Path) -> bool:
  """For a ckpt_meta.json written before it said whether a checkpoint followed: True
  unless metrics.jsonl exists and holds no epoch's record (a start stopped early)."""
  try:
    return any(r.get("epoch", -1) >= 0 for r in read_metrics(workdir / "metrics.jsonl"))
  except (OSError, ValueError, AttributeError):
    return True


def _mark_checkpointed(workdir: Path):
  """Records in ckpt_meta.json that this run wrote a checkpoint (from then on a fresh
  start never replaces its results)."""
  meta = _read_run_meta(workdir)
  if not meta.get("checkpointed"):
    meta["checkpointed"] = True
    data.atomic_write(str(workdir / RUN_META), lambda f: f.write(json.dumps(meta).encode()))


# Model fields that do not change the model (a resume may change them freely).
_FREE_MODEL_FIELDS = ("enc_max_bs", "dtype")


def _start(workdir: Path, resume: bool, model_cfg: QincoConfig,
           train_cfg: train.TrainConfig, n_train: int, d: int, data_fp: str
           ) -> tuple[checkpoint.TrainCheckpoints | None, dict[str, Any]]:
  """Process 0's view of the workdir: the checkpoints (None when an error stops the
  run) and {"step": latest checkpoint or None, "meta": ckpt_meta.json, "changed":
  training settings that differ from the checkpoint's} or {"error": message}."""
  ckpts = None
  try:
    if (workdir / "ckpt").is_dir():
      ckpts = checkpoint.TrainCheckpoints(workdir / "ckpt")
    step = None if ckpts is None else ckpts.latest_step()
    if step is None:
      error = _fresh_start_error(workdir)
      if error is not None:
        raise ValueError(error)
      if ckpts is None:
        ckpts = checkpoint.TrainCheckpoints(workdir / "ckpt")
      return ckpts, {"step": None}
    if not resume:
      raise ValueError(f"{str(workdir)!r} already holds a training checkpoint; pass "
                       "resume=True (--config.resume=True) or use another workdir")
    meta = _read_run_meta(workdir)
    saved = QincoConfig.from_dict(meta["model"]).to_dict()
    asked = model_cfg.to_dict()
    diff = {k: (saved[k], asked[k]) for k in saved
            if saved[k] != asked[k] and k not in _FREE_MODEL_FIELDS}
    if diff:
      listed = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} asked" for k, (a, b) in
                         sorted(diff.items()))
      raise ValueError(f"cannot resume {str(workdir)!r} with another model ({listed}); "
                       "resume with the checkpoint's model config, or train the new "
                       "model in another workdir")
    if meta["d"] != d:
      raise ValueError(f"cannot resume {str(workdir)!r} on vectors of dimension {d}: its "
                       f"model was trained on dimension {meta['d']}. Resume with that "
                       "training data, or train in another workdir")
  except ValueError as e:
    if ckpts is not None:
      ckpts.close()
    return None, {"error": str(e)}
  changed = {}
  if "train" in meta:
    now = dataclasses.asdict(train_cfg)
    changed = {k: [meta["train"].get(k), v] for k, v in now.items()
               if meta["train"].get(k) != v}
  if meta.get("n_train", n_train) != n_train:
    changed["n_train"] = [meta["n_train"], n_train]
  if meta.get("train_data", data_fp) != data_fp:  # the same size, other vectors
    changed["train_data"] = [meta["train_data"], data_fp]
  return ckpts, {"step": step, "meta": meta, "changed": changed}


def validate(codec: Codec, val: np.ndarray, A: int, B: int, mse_scale: float):
  codes = codec.encode(val, A=A, B=B, verbose=False)
  per_step = [metrics.mse(val, codec.decode(codes[:, :m], verbose=False), mse_scale)
              for m in range(1, codec.n_codes + 1)]
  usage = metrics.codebook_usage(codes[:, codec.cfg.n_ivf:], codec.K)
  return {"val_mse": per_step[-1], "val_per_step_mse": per_step,
          "val_mean_entropy": usage["mean_entropy"]}


def train_and_evaluate(model_cfg: QincoConfig, train_cfg: train.TrainConfig,
                       ds: data.Dataset, workdir: str | os.PathLike, *,
                       resume: bool = False, verbose: bool = True,
                       ivf_centroids=None,
                       clock: Callable[[], float] = time.perf_counter) -> Codec:
  """Trains a codec on ds.train (validating on ds.val) and returns the best one.

  Args:
    model_cfg: model and *training* beam (A, B).
    train_cfg: recipe (lr, schedule, batch, epochs, ...).
    ds: dataset; raw arrays (memmaps fine).
    workdir: checkpoints, best codec, metrics.jsonl.
    resume: continue from the latest checkpoint in workdir.
    ivf_centroids: (ivf_K, d) raw IVF centroids when model_cfg.ivf_K > 0 (frozen
      step 0; spec 4.1).
    clock: seconds, for the time budget and the reported rates (injectable so that
      tests run on scripted time).

  Raises:
    RuntimeError: another training holds the workdir (its lock names it).
    ValueError: a checkpoint exists and resume is False; a resume asks for another
      model than the checkpoint's (the differing fields are listed); invalid data.
  A resume with other training settings (lr, epochs, data size, ...) applies them
  with a warning, also recorded in metrics.jsonl.
  """
  t_call = clock()
  workdir = Path(workdir).absolute()  # Orbax wants absolute paths
  main = dist.is_main()  # process 0 reads and writes the workdir; the others never do
  verbose = verbose and main
  mesh = data_mesh()
  G = train_cfg.batch_per_device * jax.device_count()
  n = len(ds.train)
  S = min(train_cfg.loop, n)
  steps = S // G
  if steps < 1:
    raise ValueError(f"the global batch ({G}) is larger than an epoch ({S} samples): "
                     "lower batch_per_device or provide more training vectors")
  order = BatchOrder(n, S, G, train_cfg.seed)
  tx = train.make_optimizer(train_cfg, steps)
  data.as_float32(ds.val, d=ds.d, name="validation vectors (the val split)",
                  allow_empty=False)
  data_fp = fingerprint(ds.train)
  # The processes meet in every step: each must run this same training on the same data.
  dist.agree_on("the training settings", {
      "model": model_cfg.to_dict(), "train": dataclasses.asdict(train_cfg),
      "resume": resume, "train_data": {"shape": list(ds.train.shape),
                                       "fingerprint": data_fp},
      "val_data": list(ds.val.shape)})
  ckpts = lock = None
  start = None
  if main:
    workdir.mkdir(parents=True, exist_ok=True)
    try:
      lock = checkpoint.WorkdirLock(workdir)
    except RuntimeError as e:
      start = {"error": str(e), "busy": True}
    if start is None:
      ckpts, start = _start(workdir, resume, model_cfg, train_cfg, n, ds.d, data_fp)
  start = dist.broadcast_json(start)
  try:
    if "error" in start:
      raise (RuntimeError if start.get("busy") else ValueError)(start["error"])
    return _train(model_cfg, train_cfg, ds, workdir, start, ckpts, verbose=verbose,
                  ivf_centroids=ivf_centroids, clock=clock, t_call=t_call, mesh=mesh,
                  G=G, n=n, S=S, steps=steps, order=order, tx=tx, data_fp=data_fp)
  finally:
    if ckpts is not None:
      ckpts.close()
    if lock is not None:
      lock.release()


def _initial_state(model_cfg, train_cfg, ds, workdir, start, ckpts, *, verbose,
                   ivf_centroids, n, tx, replicated, data_fp):
  """(codec, train state on the devices, meta): a new RQ-initialised codec, or the
  checkpoint `start` names (read by process 0, sent to the others)."""
  main = dist.is_main()
  resuming = start["step"] is not None
  if resuming:
    m = start["meta"]
    codec = Codec(QincoConfig.from_dict(m["model"]), m["d"],
                  _abstract_state(m["model"], m["d"]))
  else:
    codec = Codec.create(model_cfg, ds.train, seed=train_cfg.seed, verbose=verbose,
                         ivf_centroids=ivf_centroids)
    # Every process computed the same RQ initialisation; process 0's copy makes it
    # bit-identical even across hosts whose floating point differs.
    codec = codec.replace_state(jax.tree.map(jnp.asarray, dist.broadcast(codec.state)))
    if main:
      data.atomic_write(str(workdir / RUN_META), lambda f: f.write(json.dumps({
          "model": model_cfg.to_dict(), "d": codec.d,
          "train": dataclasses.asdict(train_cfg), "n_train": n, "train_data": data_fp,
          "checkpointed": False}).encode()))
  state = train.init_state(codec.graphdef, codec.state, tx)
  if resuming:
    host_state = dist.host(state)
    meta = None
    if main:
      host_state, meta = ckpts.restore(host_state, start["step"])
    state, meta = dist.broadcast(host_state), dist.broadcast_json(meta)
  else:
    meta = {"epoch": 0, "best_val": None, "bad_epochs": 0, "lr_scale": 1.0}
  return codec, jax.device_put(state, replicated), meta


def _train(model_cfg, train_cfg, ds, workdir, start, ckpts, *, verbose, ivf_centroids,
           clock, t_call, mesh, G, n, S, steps, order, tx, data_fp) -> Codec:
  """The body of `train_and_evaluate`, once the workdir is locked and read."""
  main = dist.is_main()
  replicated, batch_sharding = shardings(mesh)
  codec, state, meta = _initial_state(model_cfg, train_cfg, ds, workdir, start, ckpts,
                                      verbose=verbose, ivf_centroids=ivf_centroids, n=n,
                                      tx=tx, replicated=replicated, data_fp=data_fp)
  plan = budget.Planner(train_cfg, steps, meta, t_call, clock)
  step_fn = make_step(codec, tx, mesh)
  writer = MetricWriter(workdir)
  if meta["best_val"] is None and main and writer.path.exists():
    writer.path.unlink()  # a fresh run: drop the log of a run whose checkpoints are gone
  if start.get("changed"):
    note = ("resumed with training settings that differ from the checkpoint's (applied): "
            + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in start["changed"].items()))
    if main:
      warnings.warn(note, stacklevel=2)
    writer.write({"epoch": meta["epoch"], "warning": note, "changed": start["changed"]})
  if start["step"] is not None and main:
    _write_pending_record(writer, meta.get("record"))
  A, B = codec.cfg.A, codec.cfg.B

  def current_codec():
    params_rest = dist.host((state.params, state.rest))
    return codec.replace_state(nnx.merge_state(*params_rest))

  def validation(cur: Codec) -> dict[str, Any]:
    """Process 0 validates; every process takes its numbers (the same decisions)."""
    v = validate(cur, ds.val, A, B, ds.mse_scale) if main else None
    return dist.broadcast_json(v)

  if verbose and S < train_cfg.loop:
    print(f"an epoch is one pass over the {n:,} training vectors (loop="
          f"{train_cfg.loop:,} is larger): {steps} batches of {G}", flush=True)
  if meta["best_val"] is None:  # validation before training (spec 9.6)
    if verbose:
      print(f"validating the initial (RQ-initialised) model on {len(ds.val):,} vectors",
            flush=True)
    t_val = clock()
    v = validation(current_codec())
    plan.reserve = clock() - t_val  # the first-epoch guard keeps one validation back
    meta["best_val"] = v["val_mse"]
    writer.write({"epoch": -1, "step": 0, **v})
    if verbose:
      print(f"initial val MSE {v['val_mse']:.5g}", flush=True)
    if main:
      current_codec().save(workdir / "best")
    dist.barrier("initial-best")
  gstep = int(dist.host(state.step))  # updates done (host copy of state.step)

  def report(note: str | None):  # a budget the run cannot keep: warned and logged
    if note and main:
      warnings.warn(note, stacklevel=3)
    if note:
      writer.write({"epoch": meta["epoch"], "warning": note})
  report(plan.start(meta["epoch"], gstep, t_call))
  marked = False  # ckpt_meta.json says that a checkpoint was written
  for epoch in range(meta["epoch"], plan.epochs):
    if plan.done(gstep):
      break
    t0 = clock()
    bar = tqdm(range(steps), desc=f"epoch {epoch}", unit="batch", disable=not verbose,
               leave=False)
    done = 0
    for j in bar:
      if plan.done(gstep):
        break  # the budget ends inside this epoch
      if (lr := plan.lr(gstep)) is not None:
        state = _set_lr(state, lr, replicated)
      gstep += 1
      done = j + 1
      batch = _global_batch(ds.train, order.indices(epoch, j), batch_sharding)
      with dist.peer_guard(f"training step {gstep} (epoch {epoch})"):
        state, m = step_fn(state, batch)
      plan.after_update(epoch, j, gstep, m)
      last = j + 1 == steps or plan.done(gstep)
      if (j + 1) % train_cfg.log_every == 0 or last:
        with dist.peer_guard(f"training step {gstep} (epoch {epoch})"):
          m = {k: float(v) for k, v in dist.host(m).items()}
        _check_finite(m, epoch, j)
        rate = (j + 1) * G / max(clock() - t0, 1e-9)
        bar.set_postfix(loss=f"{m['loss']:.4g}", samples_s=f"{rate:.0f}")
        writer.write({"epoch": epoch, "step": gstep, "samples_s": rate, **m})
    train_s = clock() - t0
    cur = current_codec()
    v = validation(cur)
    hist = dist.host(state.usage)  # (M, K) codes chosen this epoch, all processes summed
    n_unused = (hist == 0).sum(1).tolist()
    improved = v["val_mse"] < meta["best_val"] - 1e-6
    if improved:
      meta["best_val"], meta["bad_epochs"] = v["val_mse"], 0
      if main:
        cur.save(workdir / "best")
    else:
      meta["bad_epochs"] += 1
    state = _between_epochs(state, train_cfg, codec, epoch, meta["bad_epochs"])
    meta["epoch"] = epoch + 1
    plan.end_epoch(epoch, gstep)  # elapsed time; a budget re-plans from it
    record = {"epoch": epoch, "step": gstep, "train_s": train_s,
              "samples": done * G, "samples_s": done * G / max(train_s, 1e-9),
              "unused_codes": n_unused,
              "train_entropy": _entropy_bits(hist),
              "resets": n_unused if train_cfg.reset_dead_codes else [0] * codec.M,
              "elapsed_s": meta["elapsed_s"], "plan_steps": meta["plan_steps"],
              "best_val_mse": meta["best_val"], **v}
    # The record travels in the checkpoint: a run stopped before it reaches
    # metrics.jsonl writes it when resumed (_write_pending_record).
    meta["record"] = record
    if main:
      _save(ckpts, epoch + 1, state, meta)
      if not marked:
        _mark_checkpointed(workdir)
        marked = True
    dist.barrier(f"epoch-{epoch}")  # the others wait while process 0 writes
    writer.write(record)
    if verbose:
      print(f"epoch {epoch}: val MSE {v['val_mse']:.5g} (best {meta['best_val']:.5g}), "
            f"{record['samples_s']:.0f} samples/s, unused codes {sum(n_unused)}",
            flush=True)
    if meta["bad_epochs"] > train_cfg.stop_patience:
      break
  report(plan.finish())
  return _best_codec(workdir, codec)


def _write_pending_record(writer: MetricWriter, record: dict[str, Any] | None):
  """Appends the record of the checkpoint's last epoch to metrics.jsonl when the run
  stopped between that checkpoint and the record (the only time it is missing)."""
  if record is None:
    return
  try:
    done = read_metrics(writer.path) if writer.path.exists() else []
  except ValueError:
    done = []
  if not any(r.get("epoch") == record["epoch"] and "val_mse" in r for r in done):
    writer.write(record)


def _between_epochs(state: train.TrainState, train_cfg: train.TrainConfig, codec: Codec,
                    epoch: int, bad_epochs: int) -> train.TrainState:
  """Dead-codeword reset (spec 9.7; else the usage counts restart) and the plateau
  schedule's lr cut after `plateau_patience` epochs without improvement."""
  if train_cfg.reset_dead_codes:
    key = jax.random.fold_in(jax.random.key(train_cfg.seed), epoch)
    state, _ = train.reset_dead_codes(state, key, codec.cfg.codebook_noise_init,
                                      *train.reset_scales(codec.cfg, codec.d))
  else:
    state = state._replace(usage=jnp.zeros_like(state.usage))
  if train_cfg.schedule == "plateau" and bad_epochs and (
      bad_epochs % train_cfg.plateau_patience == 0):
    state = _scale_lr(state, 0.1, train_cfg)
  return state


def _best_codec(workdir: Path, like: Codec) -> Codec:
  """The best codec, read by process 0 and sent to the others (no shared disk needed)."""
  best = load(workdir / "best") if dist.is_main() else like
  if not dist.multi():
    return best
  state = jax.tree.map(jnp.asarray, dist.broadcast(best.state))
  return Codec(like.cfg, like.d, state, dist.broadcast_json(best.info))


def _abstract_state(model: dict, d: int):
  """A placeholder state of the right structure; the checkpoint overwrites it."""
  return nnx.state(Qinco(QincoConfig.from_dict(model), d, rngs=nnx.Rngs(0)))


def _entropy_bits(hist: np.ndarray) -> list[float]:
  p = hist / np.maximum(hist.sum(1, keepdims=True), 1)
  return (-(p * np.log2(np.where(p > 0, p, 1))).sum(1)).tolist()


def _check_finite(m: dict[str, float], epoch: int, step: int):
  if not all(np.isfinite(v) for v in m.values()):
    raise FloatingPointError(
        f"training diverged at epoch {epoch}, step {step}: metrics {m}. The last good "
        "checkpoint is intact; lower the learning rate or check the data.")


def _set_lr(state: train.TrainState, lr: float, sharding) -> train.TrainState:
  hp = train.hyperparams(state.opt)
  # Every process passes the same value (the plan is agreed), as multi-host needs.
  hp["learning_rate"] = jax.make_array_from_process_local_data(
      sharding, np.asarray(lr, hp["learning_rate"].dtype), ())
  return state


def _scale_lr(state: train.TrainState, factor: float, cfg: train.TrainConfig):
  hp = train.hyperparams(state.opt)
  hp["learning_rate"] = jnp.maximum(hp["learning_rate"] * factor, cfg.lr * 1e-2)
  return state
