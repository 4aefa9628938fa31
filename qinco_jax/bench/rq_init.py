"""RQ initialisation next to faiss's ResidualQuantizer, and what it does to short trainings.

Run by experiments/bench_rq_init.py (its docstring: usage).

Init table: on each set (GloVe with few training vectors per centroid, GloVe's full
training file, a 384-d embedding-like set), every option of `rq_init.train_rq` is
trained on the same vectors as faiss `ResidualQuantizer` (beams 1 and 5, its default
training) and all are encoded with one beam search (`rq_init.rq_encode`, greedy and at
the training beam B=4) on held-out vectors. Trainings: the GloVe 8-byte codec of the
"quality per CPU-minute" benchmark trained for the budget with the old RQ init
(random seeds, no splitting), the new default, and the new one without codebook noise.
Results go to docs/benchmarks.md.
"""

import dataclasses
import os
import time

import numpy as np
from absl import logging

import qinco_jax as qj
from qinco_jax import aq, data, rq_init, train
from qinco_jax.baselines import FaissQuantizer
from qinco_jax.bench.harness import (
  DOC,
  RUNS,
  fresh_training,
  glove_small_recipe,
  log,
  write_section,
)
from qinco_jax.config import flag
from qinco_jax.evaluate import evaluate


@dataclasses.dataclass(frozen=True)
class RQInitBench:
  """What `run` measures (flags of experiments/bench_rq_init.py)."""
  sets: tuple[str, ...] = flag(("glove18k", "glove", "emb384"), "data sets of the init table")
  M: int = flag(8, "bytes (K = 256)")
  minutes: tuple[float, ...] = flag((), "budgets of the short trainings (empty: none)")
  lr: float = flag(4e-3, "peak learning rate of the trainings")
  workdir: str = flag(os.path.join(RUNS, "bench_rq_init"), "training workdirs")
  doc: str = DOC


START, END = "<!-- bench_rq_init:start -->", "<!-- bench_rq_init:end -->"
K = 256
OPTIONS = {  # name -> train_rq keyword arguments
    "old: random seeds, 10 Lloyd it.": dict(init="random", split_iters=0),
    "random seeds + split small clusters": dict(init="random"),
    "random + split, 25 Lloyd it.": dict(init="random", n_iter=25),
    "k-means++ seeds + split": dict(init="kmeans++"),
    "new default: progressive dims + split": dict(),
    "progressive + refine (beam 5 codes, joint LS)": dict(refine=1, refine_beam=5),
}


def load(name):
  if name == "emb384":
    ds = data.load_embedding_mixture()
    return ds.name, np.asarray(ds.train), np.asarray(ds.db)
  g = data.load_glove(with_gt=False)
  n = 18_000 if name == "glove18k" else len(g.train)
  return f"GloVe, {n:,} training vectors", np.asarray(g.train[:n]), np.asarray(g.db[:5000])


def mse(x, tables, B):
  x_hat = aq.aq_decode(tables, rq_init.rq_encode(x, tables, B))
  return qj.metrics.mse(x, x_hat)


def init_rows(opts, name):
  title, xt, xe = load(name)
  log(f"{title}: {xt.shape}, held out {len(xe):,}")
  rows = []
  for beam in (1, 5):
    rq = FaissQuantizer("RQ", xt.shape[1], opts.M, beam=beam)  # faiss's default training
    t0 = time.perf_counter()
    rq.train(xt)
    dt = time.perf_counter() - t0
    tables = rq.codebooks()
    rows.append((f"faiss RQ, trained at beam {beam}", mse(xe, tables, 1), mse(xe, tables, 4),
                 dt))
  for opt, kw in OPTIONS.items():
    t0 = time.perf_counter()
    tables = np.stack(rq_init.train_rq(xt, K, opts.M, **kw)[0])
    dt = time.perf_counter() - t0
    rows.append((f"ours, {opt}", mse(xe, tables, 1), mse(xe, tables, 4), dt))
    log(f"  {rows[-1][0]}: {rows[-1][1]:.4f}")
  return title, len(xt), rows


def recipe(opts: RQInitBench, minutes: float, noise: float,
           loop: int) -> tuple[qj.QincoConfig, train.TrainConfig]:
  """glove_small (L=2, de=64, dh=128, A=B=4, RQ init) at M bytes, codebook noise and
  lr, trained for `minutes` (the plan seeded by TrainConfig's default epochs) without
  early stopping."""
  return glove_small_recipe(
      dict(M=opts.M, init="rq", codebook_noise_init=noise),
      dict(lr=opts.lr, epochs=None, stop_patience=1000, time_budget_s=minutes * 60), loop)


def training_row(opts, ds, ev_ds, minutes, old_init, noise):
  cfg, tc = recipe(opts, minutes, noise, len(ds.train))
  work = os.path.join(opts.workdir, f"{minutes:g}min_{'old' if old_init else 'new'}_{noise:g}")
  saved = rq_init.SPLIT_ITERS, rq_init.KMEANS_INIT
  if old_init:  # the K-means before this benchmark: random seeds, no splitting
    rq_init.SPLIT_ITERS, rq_init.KMEANS_INIT = 0, "random"
  try:
    run = fresh_training(cfg, tc, ds, work)
  finally:
    rq_init.SPLIT_ITERS, rq_init.KMEANS_INIT = saved
  val = run.val
  ev = evaluate(run.codec, ev_ds, A=16, B=32, verbose=False)
  label = f"{'old' if old_init else 'new'} RQ init, codebook noise {noise:g}"
  log(f"  {minutes:g} min, {label}: val init {val[0]:.4f} best {min(val):.4f}, "
      f"db MSE {ev['mse']:.4f}")
  return (minutes, label, val[0], min(val), ev["mse"])


def run(opts: RQInitBench, command: str) -> None:
  """The init table (and the short trainings `opts.minutes` names); writes the doc."""
  log(command)
  logging.set_verbosity(logging.WARNING)
  tables = [init_rows(opts, name) for name in opts.sets]
  trainings = []
  if opts.minutes:
    ds = data.load_glove(with_gt=False)
    assert ds.db is not None
    ev_ds = data.Dataset(ds.name, ds.train, ds.val, ds.db[:10_000], None, None)
    for minutes in map(float, opts.minutes):
      for old_init, noise in ((True, 0.1), (False, 0.1), (False, 0.0)):
        log(f"training {minutes:g} min (old init={old_init}, noise={noise})")
        trainings.append(training_row(opts, ds, ev_ds, minutes, old_init, noise))
  report(opts, tables, trainings)


def report(opts, tables, trainings):
  flags_used = f" --minutes={','.join(f'{m:g}' for m in opts.minutes)}" if opts.minutes else ""
  lines = [START, "## RQ initialisation (ours against faiss ResidualQuantizer)", "",
           f"`python experiments/bench_rq_init.py{flags_used}` (2-core CPU). "
           f"{opts.M} bytes (K=256). Every quantiser is trained on the same vectors and "
           "encoded by the same beam search on held-out vectors (GloVe: the first 5,000 "
           "database vectors; emb384: `data.load_embedding_mixture()`'s 5,000). MSE = "
           "mean squared error summed over dimensions; ratios divide by faiss beam 1's "
           "greedy MSE. faiss trains with its defaults (progressive dimensions, K-means on "
           "at most 256 vectors per centroid) at the beam named.", ""]
  for title, n, rows in tables:
    ref = rows[0][1]
    lines += [f"**{title}** ({n / K:.0f} training vectors per codeword)", "",
              "| quantiser | greedy MSE | / faiss beam 1 | MSE at beam 4 | seconds |",
              "|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]:.4f} | {r[1] / ref:.3f} | {r[2]:.4f} | {r[3]:.1f} |"
              for r in rows]
    lines.append("")
  if trainings:
    lines += ["Short trainings (GloVe, 8 bytes, L=2, de=64, dh=128, trained at A=B=4 for "
              f"the budget at lr {opts.lr:g}; database MSE on 10,000 vectors at A=16, B=32):",
              "", "| minutes | initialisation | val MSE at init | best val MSE | db MSE |",
              "|---|---|---|---|---|"]
    lines += [f"| {m:g} | {lab} | {v0:.4f} | {vb:.4f} | {db:.4f} |"
              for m, lab, v0, vb, db in trainings]
  lines.append(END)
  block = "\n".join(lines)
  print(block)
  write_section(opts.doc, block, START, END)

