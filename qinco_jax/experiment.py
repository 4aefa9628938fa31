"""Experiment glue: an ml_collections config -> (QincoConfig, TrainConfig, Dataset),
and `run(config, workdir)`, the body of `experiments/train_bigann.py`.

Kept in the package (not in the script) so tests and notebooks run the same code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, NoReturn

from qinco_jax import data, distributed, train, trainer
from qinco_jax.config import QincoConfig, preset
from qinco_jax.evaluate import evaluate, faiss_rq_baseline

BIGANN_FILES = dict(trainset="bigann_learn.bvecs", db="bigann_base.bvecs",
                    queries="bigann_query.bvecs", gt="gnd/idx_1M.ivecs")


def _set(d: dict) -> dict[str, Any]:
  return {k: v for k, v in d.items() if v is not None}


def model_config(c, d: int) -> QincoConfig:
  over = _set({k: v for k, v in c.model.items() if k != "de_is_D"})
  if c.model.get("de_is_D", False):
    over["de"] = None
  return preset(c.preset, **over)


def train_config(c) -> train.TrainConfig:
  over = _set(dict(c.train))
  over["loop"] = c.ds.loop
  return train.train_preset(c.preset, **over)


def describe(c) -> str:
  """The resolved model and training configs of an experiment config, as JSON
  (the data dimension is not known before loading, so `de` shows the preset's)."""
  mcfg, tcfg = model_config(c, 0), train_config(c)
  return json.dumps({"model": mcfg.to_dict(), "train": dataclasses.asdict(tcfg),
                     "data": c.data.to_dict(), "ds": c.ds.to_dict(),
                     "eval": c.eval.to_dict()}, indent=2, default=str)


def dataset(c) -> data.Dataset:
  name = c.data.name
  if c.data.trainset:  # explicit files win over the named dataset
    files = {k: c.data[k] or None for k in ("trainset", "db", "queries", "gt")}
  elif name == "bigann":
    if not c.data.root:
      raise ValueError("data.name='bigann' needs --config.data.root=DIR holding "
                       + ", ".join(BIGANN_FILES.values()))
    files = {k: os.path.join(c.data.root, v) for k, v in BIGANN_FILES.items()}
  elif name == "glove":
    return data.load_glove(valset=c.ds.valset)
  elif name == "synthetic":
    return data.load_synthetic(n_train=c.ds.trainset or 20_000, n_db=c.ds.db or 5_000,
                               n_val=c.ds.valset, d=32)
  else:
    raise ValueError(f"unknown data.name {name!r}: use glove, synthetic, bigann, or "
                     "give data.trainset (and data.db, data.queries, data.gt)")
  return data.load_files(files["trainset"], files["db"], files["queries"], files["gt"],
                         valset=c.ds.valset, n_train=c.ds.trainset or None,
                         n_db=c.ds.db or None, mse_scale=c.data.mse_scale)


def run(c, workdir: str) -> dict[str, Any]:
  """Trains, evaluates on the database, prints and returns a JSON-able summary.

  Process 0 says what each long step does, writes eval.json and a rate-distortion
  plot (rate_distortion.png: MSE per number of codes, QINCo2 and faiss RQ) into the
  workdir, and prints a table with the ratio to faiss RQ and the total time. In a
  multi-process run (call `distributed.initialize` first) every process trains;
  process 0 evaluates while the others wait for it.
  """
  t0 = time.perf_counter()
  distributed.initialize()  # no-op unless the environment describes several processes
  main = distributed.is_main()
  say = (lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)) if main \
      else (lambda msg: None)
  say(f"loading data ({c.data.name if not c.data.trainset else c.data.trainset})")
  ds = dataset(c)
  if c.ds.trainset and c.data.name in ("glove",):
    ds = data.Dataset(ds.name, ds.train[: c.ds.trainset], ds.val, ds.db, ds.queries,
                      ds.gt, ds.mse_scale)
  mcfg, tcfg = model_config(c, ds.d), train_config(c)
  say(f"training on {len(ds.train):,} vectors (validation: {len(ds.val):,}) in {workdir}")
  codec = trainer.train_and_evaluate(mcfg, tcfg, ds, workdir, resume=c.resume)
  t_train = time.perf_counter() - t0
  summary: dict[str, Any] = {"model": repr(codec), "train_A": mcfg.A, "train_B": mcfg.B,
                             "train_s": t_train}
  if ds.db is not None and main:
    ev = ds
    if c.ds.db and c.ds.db < len(ds.db):  # a prefix: no recall (ground truth is for all)
      ev = data.Dataset(ds.name, ds.train, ds.val, ds.db[: c.ds.db], None, None,
                        ds.mse_scale)
    A = codec.cfg.A if c.eval.A is None else c.eval.A
    B = codec.cfg.B if c.eval.B is None else c.eval.B
    assert ev.db is not None  # ds.db or a prefix of it
    say(f"encoding the {len(ev.db):,} database vectors at A={A}, B={B}")
    summary["qinco"] = evaluate(codec, ev, A=A, B=B)
    if c.eval.rq_baseline:
      n_rq = min(c.eval.rq_train, len(ds.train))
      say(f"faiss RQ baseline: beam {c.eval.rq_beam}, trained on {n_rq:,} vectors")
      summary["faiss_rq"] = faiss_rq_baseline(
          ev, mcfg.M, nbits=(mcfg.K - 1).bit_length(), beam=c.eval.rq_beam,
          n_train=c.eval.rq_train, verbose=True)
    summary["total_s"] = time.perf_counter() - t0
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(summary, f, indent=2)
    _plot(summary, os.path.join(workdir, "rate_distortion.png"), ds.name)
    print(format_summary(summary), flush=True)
  distributed.barrier("evaluated")  # the others exit once process 0 is done
  return summary


def _plot(s: dict[str, Any], path: str, name: str):
  try:
    from qinco_jax import plots
    res = {f"QINCo2 (A={s['qinco']['A']}, B={s['qinco']['B']})":
           list(enumerate(s["qinco"]["per_step_mse"], 1))}
    if "faiss_rq" in s and "per_step_mse" in s["faiss_rq"]:
      res[s["faiss_rq"]["method"]] = list(enumerate(s["faiss_rq"]["per_step_mse"], 1))
    plots.rate_distortion(res, path=path, xlabel="codes (bytes when K = 256)",
                          title=f"{name}: database MSE per number of codes")
  except ImportError:
    pass  # matplotlib missing: the numbers are in eval.json


def format_summary(s: dict[str, Any]) -> str:
  rows = [("QINCo2 " + f"(A={s['qinco']['A']}, B={s['qinco']['B']})", s["qinco"])]
  if "faiss_rq" in s:
    rows.append((s["faiss_rq"]["method"], s["faiss_rq"]))
  lines = [s["model"], f"{'method':32s} {'MSE':>10s} {'R@1':>7s} {'R@10':>7s} {'R@100':>7s}"]
  for name, r in rows:
    rec = [f"{r[k]:7.4f}" if k in r else "      -" for k in ("R@1", "R@10", "R@100")]
    lines.append(f"{name:32s} {r['mse']:10.5g} " + " ".join(rec))
  if "faiss_rq" in s:
    q, f = s["qinco"], s["faiss_rq"]
    ratio = f"QINCo2 / faiss RQ: MSE {q['mse'] / f['mse']:.3f}x"
    if "R@1" in q and "R@1" in f and f["R@1"] > 0:
      ratio += f", R@1 {q['R@1'] / f['R@1']:.3f}x"
    lines.append(ratio)
  lines += [
      f"MSE: squared error summed over the dimensions, mean over the {s['qinco']['n']:,} "
      "database vectors (times mse_scale). R@k: share of queries whose true nearest "
      "neighbour is among the first k of an exact search of the decoded database.",
      f"time: {s.get('total_s', s['train_s']) / 60:.1f} min in all, "
      f"{s['train_s'] / 60:.1f} min of it training (RQ initialisation and validation "
      "included)."]
  return "\n".join(lines)


def define_config_flag(default_path: str):
  """`--config=FILE` (ml_collections, locked) for the scripts. Overrides naming a field
  the config lacks end with one line, `_exit_on_unknown_field`, not a traceback
  (ml_collections applies them to the default file as soon as the flag is defined)."""
  import sys

  from ml_collections import config_flags
  try:
    config_flags.DEFINE_config_file("config", default_path, "experiment config",
                                    lock_config=True)
  except (AttributeError, KeyError) as e:
    _exit_on_unknown_field(sys.argv, _config_path(sys.argv, default_path), e)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing for the scripts (`app.run(main, flags_parser=parse_flags)`),
  with `define_config_flag`'s one-line errors for unknown `--config.*` fields."""
  import sys

  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # as absl's own parser: one line, then where help is
    sys.stderr.write(f"FATAL Flags parsing error: {e}\n"
                     "Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)
  except (AttributeError, KeyError) as e:
    default = flags.FLAGS["config"].default_as_str
    _exit_on_unknown_field(argv, _config_path(argv, (default or "").strip("'\"")), e)


def _config_path(argv, default: str) -> str:
  return next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), default)


def _exit_on_unknown_field(argv, path: str, err: Exception) -> NoReturn:
  """Prints `error: --config.a.b: config.a has no field 'b'; did you mean ...` and exits
  2 when an override names an unknown field; re-raises `err` otherwise."""
  import difflib
  import sys

  try:
    from ml_collections.config_flags import config_flags
    config = config_flags._ConfigFileParser(name="config").parse(path)
  except Exception:
    raise err from None
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    parts = arg[len("--config."):].split("=", 1)[0].split(".")
    node = config
    seen: list[str] = []
    for part in parts:
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        near = difflib.get_close_matches(part, keys, n=3, cutoff=0.3)
        hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
        print(f"error: {arg.split('=')[0]}: {'.'.join(['config'] + seen)} has no field "
              f"{part!r}{hint} (its fields: {', '.join(sorted(keys))})", file=sys.stderr)
        sys.exit(2)
      node, seen = node[part], seen + [part]
  raise err from None
