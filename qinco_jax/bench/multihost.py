"""What cross-process collectives cost: training throughput of the same run laid out as
1 process x N devices and as N processes x 1 device (the same global batch),
side by side on this machine. Run by experiments/bench_multihost.py (its docstring:
usage).

Each layout runs the `qinco-train` program (config glove_small, `--loop` samples
per epoch, evaluation on 1,000 database vectors only) as processes started with
`qinco_jax.distributed.launch_local`; samples/s are read from each run's
metrics.jsonl over the epochs after the first (which compiles). Results go to
docs/benchmarks.md (this benchmark's section).
"""

import dataclasses
import os
import sys

from qinco_jax import distributed, trainer
from qinco_jax.bench.harness import DOC, RUNS, log, write_section
from qinco_jax.config import flag

# `qinco-train` (experiments/train_bigann.py) as a command that needs no clone. (`-c`
# puts the current directory first on the children's sys.path: run from a clone's
# root, they import the clone's qinco_jax, as the parent does with an editable install.)
TRAIN = [sys.executable, "-c", "from qinco_jax import cli; cli.train()"]


@dataclasses.dataclass(frozen=True)
class MultihostBench:
  """The layouts `run` times (flags of experiments/bench_multihost.py)."""
  layouts: tuple[str, ...] = flag(("1x2", "2x1"), "PROCESSESxDEVICES per layout")
  loop: int = flag(60_000, "training samples per epoch")
  epochs: int = flag(3, "epochs per run (the first is not timed)")
  workdir: str = flag(os.path.join(RUNS, "bench_multihost"), "one sub-directory per layout")
  doc: str = DOC


def run_layout(opts: MultihostBench, procs: int, devices: int) -> dict:
  work = os.path.join(opts.workdir, f"{procs}x{devices}")
  if os.path.exists(work):
    raise SystemExit(f"{work} exists (an earlier run): remove it or pass --workdir")
  argv = [*TRAIN, "--config=glove_small",
          f"--workdir={work}", f"--config.ds.loop={opts.loop}",
          f"--config.train.epochs={opts.epochs}", "--config.train.stop_patience=100",
          "--config.eval.rq_baseline=False", "--config.ds.db=1000"]
  ps = distributed.launch_local(argv, procs, devices_per_process=devices)
  rcs = [p.wait() for p in ps]
  if any(rcs):
    raise SystemExit(f"layout {procs}x{devices} failed: exit codes {rcs}")
  recs = trainer.read_metrics(work)
  ep = [r for r in recs if "train_s" in r and r["epoch"] > 0]
  return {"layout": f"{procs}x{devices}", "epochs": len(ep),
          "samples_s": sum(r["samples"] for r in ep) / sum(r["train_s"] for r in ep),
          "val_mse": ep[-1]["val_mse"]}


def run(opts: MultihostBench, command: str) -> None:
  """Trains the same run in each layout; writes the doc section."""
  rows = []
  for layout in opts.layouts:
    p, d = (int(v) for v in layout.split("x"))
    rows.append(run_layout(opts, p, d))
    log(str(rows[-1]))
  base = rows[0]["samples_s"]
  lines = ["<!-- bench_multihost:start -->", "## Several processes (CPU, gloo)", "",
           f"`{command}` ({os.cpu_count()} CPUs). GloVe small model (L=2, de=64, "
           f"dh=128, A=4, B=4), global batch 2048, {opts.loop:,} samples per epoch; "
           "samples/s over the epochs after the first. Every layout trains on the same "
           "global batches (the final validation MSE shows it). With one host, the "
           "processes share its cores: the multi-process rows add gloo all-reduces "
           "over loopback TCP and one XLA thread pool per process.", "",
           "| processes x devices | samples/s | vs first row | validation MSE |",
           "|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['layout']} | {r['samples_s']:,.0f} | {r['samples_s'] / base:.2f}x "
                 f"| {r['val_mse']:.4f} |")
  lines.append("<!-- bench_multihost:end -->")
  block = "\n".join(lines)
  print(block)
  write_section(opts.doc, block, "<!-- bench_multihost:start -->", "<!-- bench_multihost:end -->")

