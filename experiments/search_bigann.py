"""Large-scale search with IVF-QINCo2: stages ivf, train, encode, build, search (or all).

  # GloVe default (database = 90k db + 290k train vectors, 10k queries), all stages:
  python experiments/search_bigann.py --workdir=runs/search_glove
  # BigANN1B layout, one stage at a time, database encoded by 4 processes:
  python experiments/search_bigann.py --data=bigann1b --root=/data/bigann --stage=ivf ...
  python experiments/search_bigann.py ... --stage=encode --shard=0/4   # and 1/4, 2/4, 3/4

Every stage reads what the previous ones wrote under --workdir.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import qinco_jax as qj  # noqa: E402
from qinco_jax import ivf, pipeline, sweep, train, trainer  # noqa: E402

STAGES = ("ivf", "train", "encode", "build", "search")
F = flags.FLAGS
flags.DEFINE_string("workdir", "runs/search_glove", "all stages read and write here")
flags.DEFINE_enum("stage", "all", STAGES + ("all",), "stage to run")
flags.DEFINE_enum("data", "glove", ["glove", "bigann1b", "deep1b"], "dataset")
flags.DEFINE_string("root", "", "directory of the BigANN/Deep1B files")
flags.DEFINE_integer("ivf_K", 1024, "IVF lists (2**20 for 1B databases)")
flags.DEFINE_integer("M", 8, "QINCo codes per vector (bytes)")
flags.DEFINE_integer("epochs", 5, "training epochs (cosine length)")
flags.DEFINE_integer("A", 4, "candidates per beam (training and encoding)")
flags.DEFINE_integer("B", 4, "beam size (training and encoding)")
flags.DEFINE_string("shard", "0/1", "encode stage: shard i/n of the database")
flags.DEFINE_integer("max_experiments", 24, "search stage: settings measured at most")

FILES = {
    "bigann1b": ("bigann_learn.bvecs", "bigann_base.bvecs", "bigann_query.bvecs",
                 "gnd/idx_1000M.ivecs"),
    "deep1b": ("learn.fvecs", "base.fvecs", "deep1B_queries.fvecs",
               "deep1B_groundtruth.ivecs"),
}


def load_data():
  """(train, database, queries, gt) for the chosen dataset."""
  if F.data == "glove":
    ds = qj.data.load_glove()
    db = np.concatenate([np.asarray(ds.db), np.asarray(ds.train)])
    gt = qj.data.cached_gt(db, ds.queries, 100, tag="glove_search_db")
    return ds.train, db, ds.queries, gt
  if not F.root:
    raise app.UsageError(f"--data={F.data} needs --root")
  paths = [os.path.join(F.root, p) for p in FILES[F.data]]
  train_x, db, queries, gt = (qj.data.read_vecs(p) for p in paths)
  return train_x[:-10_000], db, queries, gt


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  trainer.initialize_distributed()
  os.makedirs(F.workdir, exist_ok=True)
  train_x, db, queries, gt = load_data()
  stages = STAGES if F.stage == "all" else (F.stage,)
  cents_path = os.path.join(F.workdir, "centroids_ivf.npy")
  if "ivf" in stages:
    pipeline.train_ivf(train_x, F.ivf_K, F.workdir, max_points=256 * F.ivf_K)
  if "train" in stages:
    cfg = qj.preset("qinco2-S", M=F.M, L=2, de=64, dh=128, A=F.A, B=F.B, ivf_K=F.ivf_K)
    tc = train.TrainConfig(epochs=F.epochs, warmup_epochs=1, max_epochs=F.epochs + 1,
                           stop_patience=3, loop=min(len(train_x), 10_000_000))
    ds = qj.data.Dataset("train", train_x[:-10_000], train_x[-10_000:], None, None,
                         None, 1.0)
    trainer.train_and_evaluate(cfg, tc, ds, os.path.join(F.workdir, "train"),
                               resume=True, ivf_centroids=ivf.load_centroids(cents_path))
  codec = qj.load(os.path.join(F.workdir, "train")) if (
      set(stages) & {"encode", "build"}) else None
  if "encode" in stages:
    i, n = (int(v) for v in F.shard.split("/"))
    pipeline.encode_shard(codec, db, F.workdir, i, n, A=F.A, B=F.B)
  if "build" in stages:
    pipeline.build(codec, train_x, pipeline.load_shards(F.workdir), F.workdir,
                   A=F.A, B=F.B)
  if "search" in stages:
    searcher = pipeline.load(F.workdir)
    front = sweep.run_sweep(searcher, queries, gt, os.path.join(F.workdir, "sweep.jsonl"),
                            max_experiments=F.max_experiments)
    print(json.dumps(front, indent=1))


if __name__ == "__main__":
  app.run(main)
