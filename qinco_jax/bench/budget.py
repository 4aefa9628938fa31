"""Quality per CPU-minute: QINCo2 trained for a wall-time budget, next to faiss RQ.
Run by experiments/bench_budget.py (its docstring: usage).

Every (init, lr, minutes) run trains a fresh codec on the GloVe split with
`TrainConfig.time_budget_s` (the trainer plans the cosine to end with the budget, RQ
initialisation and validation included), then reports its database MSE at the
evaluation beam; faiss RQ (beams 1, 5, 32, trained on 100k vectors) at the same bytes
is measured on the same database vectors. `--n_db=0` evaluates the whole 90k
database with R@1/10/100; by default the first 10,000 database vectors, MSE only.
Finished runs are kept in WORKDIR/runs.jsonl and skipped when the command is run
again (`--replace` runs them again; the later line of a key wins); the table (the
latest row of each key in that file) goes to docs/benchmarks.md, the plot to
docs/budget.png. `--reeval` trains no codec: it evaluates the kept best codecs of runs
already trained at another beam or database (faiss RQ is measured there if it was not
yet).
"""

import dataclasses
import json
import os

from absl import logging

import qinco_jax as qj
from qinco_jax import data, rq_init, train, trainer
from qinco_jax.bench.harness import (
  DOC,
  RUNS,
  fresh_training,
  glove_small_recipe,
  log,
  write_section,
)
from qinco_jax.config import flag
from qinco_jax.evaluate import evaluate, faiss_rq_baseline


@dataclasses.dataclass(frozen=True)
class BudgetBench:
  """Which runs `run` trains or re-evaluates (flags of experiments/bench_budget.py)."""
  minutes: tuple[float, ...] = flag((1.0, 3.0, 10.0), "training budgets in minutes")
  inits: tuple[str, ...] = flag(("rq",), "QincoConfig.init values")
  lr: tuple[float, ...] = flag((1.6e-2,), "peak learning rates")
  M: int = flag(8, "bytes (K = 256)")
  L: int = flag(2, "residual blocks per step")
  de: int = flag(64, "embedding width")
  dh: int = flag(128, "hidden width")
  train_A: int = flag(4, "training beam: candidates per beam")
  train_B: int = flag(4, "training beam: beam size")
  dtype: str = flag("float32", "compute dtype of the step networks (training and "
                  "evaluation): float32 or bfloat16")
  eval_A: int = flag(16, "evaluation beam: candidates per beam")
  eval_B: int = flag(32, "evaluation beam: beam size")
  n_db: int = flag(10_000, "database vectors evaluated (0: all, with recall)")
  tag: str = flag("curve", "name of this group of rows in the table")
  replace: bool = flag(False, "run again the rows of this command that are already in "
                     "runs.jsonl (e.g. measured on a busier machine) and keep only the new "
                     "ones in the table; the old lines stay in the file")
  reeval: bool = flag(False, "train nothing: evaluate the kept best codec of each run of "
                    "this command already trained (same tag, model, init, lr and minutes, "
                    "any evaluation settings) at this evaluation beam and database; the "
                    "row copies the training figures")
  workdir: str = flag(os.path.join(RUNS, "bench_budget"), "checkpoints and runs.jsonl")
  doc: str = DOC
  plot: str = os.path.join("docs", "budget.png")

  def __post_init__(self):
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype: expected float32 or bfloat16, got {self.dtype!r}")


START, END = "<!-- bench_budget:start -->", "<!-- bench_budget:end -->"
COMMAND = "python experiments/bench_budget.py"



def eval_dataset(opts, ds):
  if opts.n_db == 0:
    return ds
  return data.Dataset(ds.name, ds.train, ds.val, ds.db[:opts.n_db], None, None)


def key(**kw) -> str:
  return json.dumps(kw, sort_keys=True)


def done_runs(path) -> dict:
  """The rows recorded so far by key (a torn last line is skipped)."""
  if not os.path.exists(path):
    return {}
  return {r["key"]: r for r in trainer.read_metrics(path)}


def record(path, row):
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")


def run_dir(opts, init, lr, minutes) -> str:
  return os.path.join(opts.workdir, f"{opts.tag}_{init}_{lr:g}_{minutes:g}min_M{opts.M}")


def recipe(opts: BudgetBench, init: str, lr: float, minutes: float,
           loop: int) -> tuple[qj.QincoConfig, train.TrainConfig]:
  """glove_small with this run's model, init, dtype and lr, trained for `minutes` (the
  plan seeded by TrainConfig's default epochs) without early stopping."""
  return glove_small_recipe(
      dict(M=opts.M, L=opts.L, de=opts.de, dh=opts.dh, A=opts.train_A, B=opts.train_B,
           init=init, dtype=opts.dtype),
      dict(lr=lr, epochs=None, stop_patience=1000, time_budget_s=minutes * 60), loop)


def qinco_row(opts, ds, ev_ds, init, lr, minutes) -> dict:
  cfg, tc = recipe(opts, init, lr, minutes, len(ds.train))
  log(f"QINCo2 {opts.M} bytes, init={init}, lr={lr:g}: {minutes:g} min")
  run = fresh_training(cfg, tc, ds, run_dir(opts, init, lr, minutes))
  ev = evaluate(run.codec, ev_ds, A=opts.eval_A, B=opts.eval_B, verbose=False)
  log(f"  MSE {ev['mse']:.4f} after {len(run.epochs)} epochs ({run.train_s / 60:.1f} min)")
  return {"method": "QINCo2", "init": init, "lr": lr, "minutes": minutes,
          "rq_kmeans": rq_init.KMEANS_INIT,
          "train_s": run.train_s, "cpu_s": run.cpu_s, "epochs": len(run.epochs),
          "samples": run.samples, "val_init": run.val[0],
          "val_best": min(run.val), **{k: ev[k] for k in ("mse", "R@1", "R@10", "R@100")
                                       if k in ev}}


TRAINING = ("rq_kmeans", "train_s", "cpu_s", "epochs", "samples", "val_init", "val_best")


def same_training(key_a: str, key_b: str) -> bool:
  """Whether two row keys name the same training (their evaluation settings aside)."""
  a, b = json.loads(key_a), json.loads(key_b)
  for d in (a, b):
    d.pop("eval"), d.pop("n_db")
  return a == b


def kept_row(opts, done, ev_ds, init, lr, minutes, k) -> dict:
  """The row of a run trained before (its line in runs.jsonl, whatever its evaluation
  settings), evaluated again from its kept best codec at this command's beam and db."""
  trained = [r for r in done.values() if r.get("method") == "QINCo2"
             and r["tag"] == opts.tag and "reeval_of" not in r and same_training(r["key"], k)]
  if not trained:
    raise ValueError(f"--reeval: no trained run of tag {opts.tag!r}, init={init}, lr={lr:g}, "
                     f"{minutes:g} min in runs.jsonl; train it first (without --reeval)")
  of = trained[-1]
  work = run_dir(opts, init, lr, minutes)
  # The folder's name does not hold the model shape, so a later run of another shape
  # may have replaced it: the kept codec must be this row's model, best validation.
  val = [r["val_mse"] for r in trainer.read_metrics(work)
         if "val_mse" in r] if os.path.isdir(work) else []
  if not val or abs(min(val) - of["val_best"]) > 1e-9:
    raise ValueError(f"--reeval: {work} does not hold the codec of that run (best "
                     f"validation MSE {min(val) if val else 'none'} against the row's "
                     f"{of['val_best']}); train it again without --reeval")
  log(f"QINCo2 {opts.M} bytes, init={init}, lr={lr:g}, {minutes:g} min: evaluating {work}")
  codec = qj.load(os.path.join(work, "best"))
  shape = (codec.cfg.M, codec.cfg.L, codec.cfg.de, codec.cfg.dh, codec.cfg.dtype)
  if shape != (opts.M, opts.L, opts.de, opts.dh, opts.dtype):
    raise ValueError(f"--reeval: {work} holds a model with (M, L, de, dh, dtype) = "
                     f"{shape}, not {(opts.M, opts.L, opts.de, opts.dh, opts.dtype)}")
  ev = evaluate(codec, ev_ds, A=opts.eval_A, B=opts.eval_B, verbose=False)
  log(f"  MSE {ev['mse']:.4f}" + (f", R@1 {ev['R@1']:.4f}" if "R@1" in ev else ""))
  return {"method": "QINCo2", "init": init, "lr": lr, "minutes": minutes,
          "reeval_of": of["key"], **{f: of[f] for f in TRAINING if f in of},
          **{k: ev[k] for k in ("mse", "R@1", "R@10", "R@100") if k in ev}}


def run(opts: BudgetBench, command: str) -> None:
  """Trains (or re-evaluates) each run `opts` names that runs.jsonl lacks; rewrites the
  doc section and the plot from every row kept there."""
  logging.set_verbosity(logging.WARNING)
  os.makedirs(opts.workdir, exist_ok=True)
  log_path = os.path.join(opts.workdir, "runs.jsonl")
  done = done_runs(log_path)
  ds = data.load_glove(with_gt=opts.n_db == 0)
  ev_ds = eval_dataset(opts, ds)
  common = dict(M=opts.M, L=opts.L, de=opts.de, dh=opts.dh, train=(opts.train_A, opts.train_B),
                eval=(opts.eval_A, opts.eval_B), n_db=opts.n_db)
  if opts.dtype != "float32":  # float32 rows keep the keys they had before the flag
    common["dtype"] = opts.dtype
  for beam in (1, 5, 32):
    k = key(kind="faiss", beam=beam, M=opts.M, n_db=opts.n_db)
    if k not in done:
      log(f"faiss RQ beam {beam}, {opts.M} bytes")
      r = faiss_rq_baseline(ev_ds, opts.M, beam=beam, n_train=100_000)
      done[k] = dict(r, key=k, tag="faiss", method=f"faiss RQ beam {beam}", beam=beam,
                     **common)
      record(log_path, done[k])
  for minutes in map(float, opts.minutes):
    for init in opts.inits:
      for lr in map(float, opts.lr):
        k = key(kind="qinco", init=init, lr=lr, minutes=minutes, **common)
        if k in done and not opts.replace:
          continue
        if opts.reeval and k in done and "reeval_of" not in done[k]:
          raise ValueError("--reeval at the training's own evaluation settings would "
                           f"replace its row; {k}")
        made = (kept_row(opts, done, ev_ds, init, lr, minutes, k) if opts.reeval else
                qinco_row(opts, ds, ev_ds, init, lr, minutes))
        row = dict(key=k, tag=opts.tag, command=command.removeprefix(COMMAND).strip(),
                   **made, **common)
        done[k] = row
        record(log_path, row)
  report(opts, list(done.values()))


def shown_command(command: str) -> str:
  """The flags that chose a run, without those that only say where outputs go."""
  where = ("--workdir=", "--doc=", "--plot=")
  return " ".join(a for a in command.split() if not a.startswith(where))


def report(opts, rows):
  faiss = {(r["M"], r["n_db"], r["beam"]): r for r in rows if r.get("tag") == "faiss"}
  q = sorted((r for r in rows if r.get("method") == "QINCo2"),
             key=lambda r: (r["M"], r["n_db"], r["tag"], r["init"], r["lr"], r["minutes"]))
  lines = [START, "## Quality per CPU-minute (QINCo2 for a time budget vs faiss RQ)", "",
           "`python experiments/bench_budget.py` (flags per row below; GloVe split of "
           "`load_glove()`, 2-core CPU shared with other jobs). Each row trains a fresh "
           "codec for the given wall-time budget (RQ initialisation and validation "
           "included; the trainer plans the cosine to end with the budget), batch 1024, "
           "then encodes the database at the evaluation beam. Ratios divide by faiss RQ "
           "(100k training vectors) on the same database vectors and bytes.", "",
           "| group | bytes | model (L, de, dh) | train A,B | eval A,B | db | init | lr | "
           "minutes | epochs | samples | MSE | / RQ beam 1 | / RQ beam 32 | R@1 |",
           "|" + "---|" * 15]
  for r in q:
    f1, f32 = faiss.get((r["M"], r["n_db"], 1)), faiss.get((r["M"], r["n_db"], 32))
    lines.append(
        f"| {r['tag']} | {r['M']} | {r['L']}, {r['de']}, {r['dh']}"
        f"{', ' + r['dtype'] if 'dtype' in r else ''} | "
        f"{r['train'][0]},{r['train'][1]} | {r['eval'][0]},{r['eval'][1]} | "
        f"{r['n_db'] or '90k'} | {r['init']}{'' if 'rq_kmeans' in r else '*'} | "
        f"{r['lr']:g} | {r['minutes']:g}{' †' if 'reeval_of' in r else ''} | "
        f"{r['epochs']} | {r['samples']:,} | {r['mse']:.4f} | "
        f"{r['mse'] / f1['mse']:.3f} | {r['mse'] / f32['mse']:.3f} | "
        f"{r.get('R@1', float('nan')):.4f} |".replace("nan", "-"))
  lines += ["", "\\* RQ initialised with the K-means before the progressive-dimension one "
            "(random seeds, no splitting; see \"RQ initialisation\").",
            "", "† not trained again: the kept best codec of the same training (the row of "
            "the same group, init, lr and minutes) evaluated at this row's beam and "
            "database (`--reeval`)."]
  commands = {}
  for r in q:
    commands.setdefault(r["tag"], set()).add(shown_command(r.get("command", "")))
  lines += ["", "Commands (`python experiments/bench_budget.py ...`):", ""]
  lines += [f"- {tag}: " + "; ".join(f"`{c}`" for c in sorted(cs)) for tag, cs in
            sorted(commands.items())]
  worst = {}
  for r in q:
    f1 = faiss.get((r["M"], r["n_db"], 1))
    if f1:
      worst[r["init"]] = max(worst.get(r["init"], 0), r["mse"] / f1["mse"])
  lines += [""] + [f"Worst MSE ratio to faiss greedy RQ (beam 1) over every budget, init "
                   f"{k}: {v:.3f}" for k, v in sorted(worst.items())]
  lines += ["", "| faiss RQ | bytes | db | MSE | R@1 |", "|---|---|---|---|---|"]
  for (M, n_db, beam), r in sorted(faiss.items()):
    lines.append(f"| beam {beam} | {M} | {n_db or '90k'} | {r['mse']:.4f} | "
                 f"{r.get('R@1', float('nan')):.4f} |".replace("nan", "-"))
  lines.append(END)
  block = "\n".join(lines)
  print(block)
  write_section(opts.doc, block, START, END)
  # The curve: MSE relative to faiss RQ beam 32 on the same database vectors (so runs
  # evaluated on 10k and on all 90k vectors share one axis), per init, for the model
  # and lr of the "curve" rows (other groups' runs at those settings included).
  same = {(r["M"], r["L"], r["de"], r["dh"], r["lr"]) for r in q if r["tag"] == "curve"}
  curve = [r for r in q if (r["M"], r["L"], r["de"], r["dh"], r["lr"]) in same
           and "dtype" not in r  # float32 rows only
           and "reeval_of" not in r]  # one point per training
  if curve:
    series = {}
    for r in curve:
      ref = faiss[(r["M"], r["n_db"], 32)]["mse"]
      series.setdefault(f"QINCo2 init={r['init']} ({r['M']} bytes, lr {r['lr']:g})",
                        []).append((r["minutes"], r["mse"] / ref))
    M, n_db = curve[0]["M"], curve[0]["n_db"]
    ref = faiss[(M, n_db, 32)]["mse"]
    lines_at = {f"faiss RQ beam {b}": faiss[(M, n_db, b)]["mse"] / ref for b in (1, 5, 32)
                if (M, n_db, b) in faiss}
    qj.plots.budget_curve(series, lines_at, path=opts.plot,
                          ylabel="database MSE / faiss RQ beam 32's",
                          title=f"GloVe, {M} bytes: MSE per training budget")

