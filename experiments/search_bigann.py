"""Large-scale search with IVF-QINCo2: stages ivf, train, encode, build, search (or all).

  # GloVe default (database = 90k db + 290k train vectors, 10k queries), all stages:
  python experiments/search_bigann.py --workdir=runs/search_glove
  # BigANN1B layout, one stage at a time, database encoded by 4 processes:
  python experiments/search_bigann.py --data=bigann1b --root=/data/bigann --stage=ivf ...
  python experiments/search_bigann.py ... --stage=encode --shard=0/4   # and 1/4, 2/4, 3/4

Every stage reads what the previous ones wrote under --workdir. Run as several
processes of one JAX job (--coordinator_address, --num_processes, --process_id, as
train_bigann.py), train trains data-parallel over all of them and encode splits the
database by process (process i writes shard i/N, the same files as N `--shard i/N`
jobs); ivf, build and search run on process 0 while the others wait. The workdir
must then be on a filesystem that every process sees.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import qinco_jax as qj  # noqa: E402
from qinco_jax import distributed, ivf, pipeline, sweep, train, trainer  # noqa: E402

STAGES = ("ivf", "train", "encode", "build", "search")
F = flags.FLAGS
flags.DEFINE_string("workdir", "runs/search_glove", "all stages read and write here")
flags.DEFINE_enum("stage", "all", STAGES + ("all",), "stage to run")
flags.DEFINE_enum("data", "glove", ["glove", "bigann1b", "deep1b"], "dataset")
flags.DEFINE_string("root", "", "directory of the BigANN/Deep1B files")
flags.DEFINE_integer("ivf_K", 1024, "IVF lists (2**20 for 1B databases)")
flags.DEFINE_integer("M", 8, "QINCo codes per vector (bytes)")
flags.DEFINE_integer("L", 2, "residual blocks per step network (train stage)")
flags.DEFINE_integer("de", 64, "embedding width E (train stage)")
flags.DEFINE_integer("dh", 128, "hidden width H (train stage)")
flags.DEFINE_integer("epochs", 5, "training epochs (cosine length)")
flags.DEFINE_float("train_min", 0.0, "training wall-time budget in minutes (0: use "
                   "--epochs); the cosine then ends with the budget")
flags.DEFINE_integer("stop_patience", 3, "train stage: stop after more than this many "
                     "epochs without a validation improvement (raise it for short epochs)")
flags.DEFINE_integer("A", 4, "candidates per beam for training (and encoding by default)")
flags.DEFINE_integer("B", 4, "beam size for training (and encoding by default)")
flags.DEFINE_integer("enc_A", -1, "encode/build stages: candidates per beam (-1: --A)")
flags.DEFINE_integer("enc_B", -1, "encode/build stages: beam size (-1: --B)")
flags.DEFINE_string("shard", "0/1", "encode stage: shard i/n of the database")
flags.DEFINE_integer("max_experiments", 24, "search stage: settings measured at most")
distributed.define_flags()

FILES = {
    "bigann1b": ("bigann_learn.bvecs", "bigann_base.bvecs", "bigann_query.bvecs",
                 "gnd/idx_1000M.ivecs"),
    "deep1b": ("learn.fvecs", "base.fvecs", "deep1B_queries.fvecs",
               "deep1B_groundtruth.ivecs"),
}


def load_data(need_gt: bool):
  """(train, val, database, queries, gt) for the chosen dataset; gt is None unless
  need_gt (only the search stage needs it: the other stages run without faiss). The
  BigANN/Deep1B learn file's last 10k rows (a tenth of a smaller file) are the
  validation set, held out once."""
  if F.data == "glove":
    ds = qj.data.load_glove(with_gt=False)
    db = np.concatenate([np.asarray(ds.db), np.asarray(ds.train)])
    gt = qj.data.cached_gt(db, ds.queries, 100, tag="glove_search_db") if need_gt else None
    return ds.train, ds.val, db, ds.queries, gt
  if not F.root:
    raise app.UsageError(f"--data={F.data} needs --root")
  paths = [os.path.join(F.root, p) for p in FILES[F.data]]
  learn, db, queries = (qj.data.read_vecs(p) for p in paths[:3])
  # 10k validation rows (the spec's), fewer for a small learn file (a tenth of it).
  train_x, val = qj.data.split_train_val(learn, min(10_000, len(learn) // 10))
  gt = qj.data.read_vecs(paths[3]) if need_gt else None
  return train_x, val, db, queries, gt


def command_line() -> str:
  """This run's command, with where it ran as a trailing comment (bench_search quotes it)."""
  env = os.environ.get("QINCO_GLOVE_NPY")
  cmd = ([f"QINCO_GLOVE_NPY={env}"] if env and F.data == "glove" else []) + [
      "python", "experiments/search_bigann.py"] + sys.argv[1:]
  dev = jax.devices()[0]
  kind = "CPU" if dev.platform == "cpu" else dev.device_kind
  return (" ".join(cmd) + f"  # on {kind} x{jax.device_count()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__}")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  distributed.initialize_from_flags()
  with distributed.exit_on_error():
    run_stages()
    distributed.barrier("search_bigann done")  # the others wait for process 0's stages


def run_stages():
  main_process = distributed.is_main()
  if main_process:  # what built this workdir (bench_search quotes it)
    os.makedirs(F.workdir, exist_ok=True)
    with open(os.path.join(F.workdir, f"command.{F.stage}.txt"), "w") as f:
      f.write(command_line() + "\n")
  stages = STAGES if F.stage == "all" else (F.stage,)
  train_x, val, db, queries, gt = load_data(need_gt="search" in stages and main_process)
  cents_path = os.path.join(F.workdir, "centroids_ivf.npy")
  if "ivf" in stages and main_process:
    pipeline.train_ivf(train_x, F.ivf_K, F.workdir, max_points=256 * F.ivf_K)
  distributed.barrier("ivf")
  if "train" in stages:
    cfg = qj.preset("qinco2-S", M=F.M, L=F.L, de=F.de, dh=F.dh, A=F.A, B=F.B, ivf_K=F.ivf_K)
    budget = F.train_min * 60 if F.train_min > 0 else None
    tc = train.TrainConfig(epochs=F.epochs, warmup_epochs=1, stop_patience=F.stop_patience,
                           max_epochs=None if budget else F.epochs + 1,
                           loop=min(len(train_x), 10_000_000), time_budget_s=budget)
    ds = qj.data.Dataset("train", train_x, val, None, None, None, 1.0)
    trainer.train_and_evaluate(cfg, tc, ds, os.path.join(F.workdir, "train"),
                               resume=True, ivf_centroids=ivf.load_centroids(cents_path))
  codec = qj.load(os.path.join(F.workdir, "train")) if (
      set(stages) & {"encode", "build"}) else None
  enc_A = F.A if F.enc_A < 0 else F.enc_A
  enc_B = F.B if F.enc_B < 0 else F.enc_B
  if "encode" in stages:
    i, n = (int(v) for v in F.shard.split("/"))
    if jax.process_count() > 1:
      if (i, n) != (0, 1):
        raise app.UsageError("--shard splits the database between independent jobs; a "
                             "multi-process run splits it by process already")
      i, n = jax.process_index(), jax.process_count()
    pipeline.encode_shard(codec, db, F.workdir, i, n, A=enc_A, B=enc_B)
  distributed.barrier("encode")
  if not main_process:
    return  # build and search: process 0
  if "build" in stages:
    db_codes = pipeline.load_shards(F.workdir, db=db)
    # GloVe: the database ends with the training set, whose codes the build reuses.
    train_codes = db_codes[len(db) - len(train_x):] if F.data == "glove" else None
    pipeline.build(codec, train_x, db_codes, F.workdir, A=enc_A, B=enc_B,
                   train_codes=train_codes)
  if "search" in stages:
    searcher = pipeline.load(F.workdir)
    log = os.path.join(F.workdir, "sweep.jsonl")
    front = sweep.run_sweep(searcher, queries, gt, log, max_experiments=F.max_experiments)
    front.sort(key=lambda r: r["ms_per_query"]["total"])
    n_run = sum(1 for _ in open(log))
    png = os.path.join(F.workdir, "sweep.png")
    qj.plots.speed_recall(
        {"Pareto front": [(1e3 / r["ms_per_query"]["total"], r["R@1"]) for r in front]},
        path=png, title=f"IVF-QINCo2 search sweep ({n_run} settings measured)")
    print(f"Pareto front of {n_run} settings measured (all in {log}; plot {png}):")
    for r in front:
      print(f"  {json.dumps(r['params'])}: R@1 {r['R@1']:.4f} R@10 {r['R@10']:.4f} "
            f"{r['ms_per_query']['total']:.3f} ms/query")


if __name__ == "__main__":
  app.run(main)
