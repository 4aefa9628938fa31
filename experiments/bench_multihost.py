"""What cross-process collectives cost: training throughput of the same run laid out as
1 process x N devices and as N processes x 1 device (the same global batch), side by
side on this machine.

  python experiments/bench_multihost.py                  # GloVe small model, ~5 min on 2 cores
  python experiments/bench_multihost.py --layouts=1x2,2x1,1x1 --epochs=4

Each layout runs `experiments/train_bigann.py` (config glove_small, `--loop` samples
per epoch, evaluation on 1,000 database vectors only) as processes started with
`qinco_jax.distributed.launch_local`; samples/s are read from each run's
metrics.jsonl over the epochs after the first (which compiles). Results go to
docs/benchmarks.md (this script's section).
"""

import os
import sys

from absl import app, flags

from bench_common import write_section
from qinco_jax import distributed, trainer

HERE = os.path.dirname(os.path.abspath(__file__))
F = flags.FLAGS
flags.DEFINE_list("layouts", ["1x2", "2x1"], "PROCESSESxDEVICES per layout")
flags.DEFINE_integer("loop", 60_000, "training samples per epoch")
flags.DEFINE_integer("epochs", 3, "epochs per run (the first is not timed)")
flags.DEFINE_string("workdir", "runs/bench_multihost", "one sub-directory per layout")
flags.DEFINE_string("doc", os.path.join(HERE, "..", "docs", "benchmarks.md"), "")


def run_layout(procs: int, devices: int) -> dict:
  work = os.path.join(F.workdir, f"{procs}x{devices}")
  if os.path.exists(work):
    raise SystemExit(f"{work} exists (an earlier run): remove it or pass --workdir")
  argv = [sys.executable, os.path.join(HERE, "train_bigann.py"),
          "--config=glove_small",
          f"--workdir={work}", f"--config.ds.loop={F.loop}",
          f"--config.train.epochs={F.epochs}", "--config.train.stop_patience=100",
          "--config.eval.rq_baseline=False", "--config.ds.db=1000"]
  ps = distributed.launch_local(argv, procs, devices_per_process=devices)
  rcs = [p.wait() for p in ps]
  if any(rcs):
    raise SystemExit(f"layout {procs}x{devices} failed: exit codes {rcs}")
  log = trainer.read_metrics(work)
  ep = [r for r in log if "train_s" in r and r["epoch"] > 0]
  return {"layout": f"{procs}x{devices}", "epochs": len(ep),
          "samples_s": sum(r["samples"] for r in ep) / sum(r["train_s"] for r in ep),
          "val_mse": ep[-1]["val_mse"]}


def main(argv):
  del argv
  rows = []
  for layout in F.layouts:
    p, d = (int(v) for v in layout.split("x"))
    rows.append(run_layout(p, d))
    print(rows[-1], flush=True)
  base = rows[0]["samples_s"]
  cmd = "python experiments/bench_multihost.py " + " ".join(sys.argv[1:])
  lines = ["<!-- bench_multihost:start -->", "## Several processes (CPU, gloo)", "",
           f"`{cmd.strip()}` ({os.cpu_count()} CPUs). GloVe small model (L=2, de=64, "
           f"dh=128, A=4, B=4), global batch 2048, {F.loop:,} samples per epoch; "
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
  write_section(F.doc, block, "<!-- bench_multihost:start -->", "<!-- bench_multihost:end -->")


if __name__ == "__main__":
  app.run(main)
