"""`qinco-compile`: compile a model's training step, encoder and decoder for a TPU slice
or a GPU host this machine does not have, and report what they would do there.

  qinco-compile --config=qinco2_l --target=v5p-128 [--slices=2] [--batch_per_chip=N]
  qinco-compile --config=qinco2_s --target=h100x8 [--hosts=4]
  qinco-compile --install_plugin=tpu      # once: the TPU compiler, outside your env
"""

from __future__ import annotations

import dataclasses
import json
import os
import runpy
import subprocess
import sys
import time
from typing import Any

from qinco_jax.aot import plugins, report, targets
from qinco_jax.config import PRESETS, flag, preset

PAPER_BATCH = 1024  # the paper's batch per device (spec 10)


class JobError(ValueError):
  """A flag value that cannot be compiled (the message is one line for the user)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompileJob:
  config: str = flag("qinco2_s", "model: an experiment config (qinco2_s, qinco2_m, qinco2_l,"
                     " glove_small, synthetic_tiny, ... or a config file) or a preset "
                     "(qinco2-S, qinco2-M, qinco2-L, qinco1)")
  target: str = flag("v5e-16", "TPU slice (v5p-128, v5e-16, v6e-256, v4-8, or a topology "
                     "such as v5p:4x4x4) or GPU host (h100x8, h200x8)")
  slices: int = flag(1, "TPU slices joined over the data-centre network")
  hosts: int = flag(1, "GPU hosts")
  batch_per_chip: int = flag(PAPER_BATCH, "training samples per chip per step")
  global_batch: int = flag(0, "training samples per step over all chips (0: "
                           "batch_per_chip x chips); must divide over the chips")
  d: int = flag(128, "data dimension (BigANN 128, Deep1B 96)")
  dtype: str = flag("bfloat16", "compute dtype of the step networks' matmuls "
                    "(bfloat16 or float32)")
  enc_max_bs: int = flag(0, "encoder candidate rows per device per call (0: the model's, "
                         "65,536); the training step's beam search uses the same chunks")
  what: tuple[str, ...] = flag(("train", "encode", "decode"),
                               "programs to compile: train, encode, decode")
  beams: tuple[str, ...] = flag(("16/32", "32/64"), "encoder beams A/B (the paper "
                                "evaluates qinco2 at A=16, B=32 and A=32, B=64)")
  max_batch: bool = flag(True, "find the largest training batch per chip that fits, by "
                         "compiling")
  json: str = flag("", "also write the results to this JSON file")
  install_plugin: str = flag("", "tpu or gpu: install that compiler into the cache "
                             "folder (not your environment) and exit")

  def __post_init__(self):
    if self.install_plugin not in ("", "tpu", "gpu"):
      raise ValueError(f"--install_plugin must be tpu or gpu, got {self.install_plugin!r}")
    if self.enc_max_bs < 0:
      raise ValueError(f"--enc_max_bs must be >= 0, got {self.enc_max_bs}")
    for name in ("batch_per_chip", "d"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
    if self.global_batch < 0:
      raise ValueError(f"--global_batch must be >= 0, got {self.global_batch}")
    if self.dtype not in ("bfloat16", "float32"):
      raise ValueError(f"--dtype must be bfloat16 or float32, got {self.dtype!r}")
    bad = sorted(set(self.what) - {"train", "encode", "decode"})
    if bad or not self.what:
      raise ValueError(f"--what takes train, encode, decode; got {list(self.what)}")
    for b in self.beams:
      parts = b.split("/")
      if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"--beams takes A/B pairs such as 16/32, got {b!r}")


def model_configs(name: str, d: int):
  """(QincoConfig, TrainConfig) of an experiment config (name or file) or a preset."""
  from qinco_jax import configs, experiment, train
  if name.lower() in {k.lower() for k in PRESETS}:
    return preset(name), train.train_preset(name)
  path = configs.config_path(name)
  if not os.path.isfile(path):
    raise JobError(f"--config={name}: no such config; give one of "
                     f"{', '.join(configs.CONFIG_NAMES)}, a preset ({', '.join(PRESETS)}) or "
                     "a config file")
  c = runpy.run_path(path)["get_config"]()
  return experiment.model_config(c, d), experiment.train_config(c)


def _as_json(x: Any) -> Any:
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return {k: _as_json(v) for k, v in dataclasses.asdict(x).items()}
  if isinstance(x, dict):
    return {str(k): _as_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_as_json(v) for v in x]
  if isinstance(x, float) and x != x:
    return None
  return x


def run(job: CompileJob, argv: list[str]) -> int:
  """The body of `qinco-compile`; argv: its flags (for the child process). Returns the
  exit status."""
  if job.install_plugin:
    print(plugins.install(job.install_plugin))
    return 0
  target = targets.parse(job.target, job.slices, job.hosts)
  model_configs(job.config, job.d)  # an unknown config fails here, before any compile
  if job.global_batch and job.global_batch % target.n_chips:
    raise JobError(f"--global_batch={job.global_batch} does not divide over the "
                   f"{target.n_chips} chips of {target.name} (use a multiple of "
                   f"{target.n_chips})")
  kind = target.chip.platform
  if not plugins.importable(kind):
    if not plugins.cached(kind):
      raise SystemExit("error: " + plugins.missing_message(kind))
    # The compiler lives in the cache folder: compile in a child that sees it.
    r = subprocess.run([sys.executable, "-m", "qinco_jax.aot", *argv],
                       env=plugins.child_env(kind))
    return r.returncode
  return compile_target(job, target)


def compile_target(job: CompileJob, target: targets.Target) -> int:
  from qinco_jax.aot import compile as aot

  def log(msg: str):
    print(msg, file=sys.stderr, flush=True)

  cfg, tc = model_configs(job.config, job.d)
  cfg = cfg.replace(dtype=job.dtype, **({"enc_max_bs": job.enc_max_bs} if job.enc_max_bs
                                         else {}))
  t0 = time.perf_counter()
  devices = target.devices()
  n = len(devices)
  hosts = len({dv.process_index for dv in devices})
  batch = job.batch_per_chip
  if job.global_batch:
    batch = job.global_batch // n
  tc = tc.replace(batch_per_device=batch)
  log(f"{target.name}: {n} chips, {hosts} hosts; {target.chip.name}: "
      f"{target.chip.hbm_bytes / 2**30:.0f} GiB HBM, {target.chip.peak_bf16 / 1e12:.0f} "
      f"TFLOP/s bf16 ({target.chip.source})")
  log(f"model {job.config}: K={cfg.K} M={cfg.M} L={cfg.L} de={cfg.de} dh={cfg.dh} "
      f"A={cfg.A} B={cfg.B} dtype={cfg.dtype}, d={job.d}")
  params = aot.param_bytes(cfg, job.d)
  programs = []
  out: dict[str, Any] = {"target": target.name, "chip": dataclasses.asdict(target.chip),
                         "chips": n, "hosts": hosts, "slices": target.slices,
                         "model": cfg.to_dict(), "config": job.config, "d": job.d,
                         "param_bytes": params, "programs": []}
  if "train" in job.what:
    log(f"compiling the training step at {batch:,} samples per chip "
        f"({batch * n:,} per step)")
    programs.append(aot.train_step(cfg, tc, job.d, target, devices, batch))
    from qinco_jax import trainer
    mesh = trainer.data_mesh(devices)
    out["train_mesh"] = [[int(dv.process_index), int(getattr(dv, "slice_index", 0) or 0)]
                         for dv in mesh.devices.flat]  # (host, slice) along "data"
    if job.max_batch:
      log("finding the largest batch per chip that fits")
      def compile_at(b: int):
        log(f"  batch per chip {b:,}")
        return aot.train_step(cfg, tc.replace(batch_per_device=b), job.d, target, devices, b)

      best, seen = aot.max_batch(compile_at, batch, known=(programs[0],))
      out["max_batch_per_chip"] = best
      out["max_batch_tries"] = [(p.rows, p.fits, p.memory.get("total")) for p in seen]
  for beam in (job.beams if "encode" in job.what else ()):
    A, B = (int(v) for v in beam.split("/"))
    log(f"compiling the encoder at A={A}, B={B}")
    programs.append(aot.encoder(cfg, job.d, target, devices, A, B))
  if "decode" in job.what:
    log("compiling the decoder")
    programs.append(aot.decoder(cfg, job.d, target, devices))
  lines = [f"# {target.name} ({n} chips, {hosts} hosts), model {job.config} "
           f"(dtype {cfg.dtype}, d={job.d}): compiled in {time.perf_counter() - t0:.0f} s"]
  for p in programs:
    lines += report.describe(p, target, params)
    pr = report.predict(p, target)
    out["programs"].append({**_as_json(p), "hlo_flops": p.hlo_flops,
                            "prediction": _as_json(pr) if pr else None})
  if "max_batch_per_chip" in out:
    lines.append(f"largest training batch per chip that fits: {out['max_batch_per_chip']:,}"
                 f" (compiled at {', '.join(f'{r:,}' for r, _, _ in out['max_batch_tries'])})")
  print("\n".join(lines), flush=True)
  if job.json:
    from qinco_jax.data import atomic_write
    atomic_write(job.json, lambda f: f.write(json.dumps(out, indent=1).encode()))
  return 0


def main(argv: list[str] | None = None) -> int:
  from qinco_jax.config import parse_config
  argv = sys.argv[1:] if argv is None else list(argv)
  job = parse_config(CompileJob, argv, __doc__ or "")
  try:
    return run(job, argv)
  except (targets.TargetError, JobError) as e:
    raise SystemExit(f"error: {e}") from None
