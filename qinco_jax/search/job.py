"""The large-scale search job (spec 12): stages ivf, train, encode, build, search over
one work directory, on GloVe or the BigANN1B / Deep1B file layouts.

`run(SearchJob(...))` is the body of `qinco-search` (`experiments/search_bigann.py`).
Every stage reads what the previous ones wrote under `workdir`, so each can run in its
own process or host. In a multi-process JAX job (`distributed.initialize` first)
train trains data-parallel over all processes, encode splits the database by
process (process i writes shard i of N, the files N `shard=(i, N)` jobs write), and
ivf, build and search run on process 0 while the others wait; the workdir must then be
on a filesystem every process sees.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import numpy as np

from qinco_jax import data, distributed, ivf, plots, train, trainer
from qinco_jax.codec import load
from qinco_jax.config import flag, preset
from qinco_jax.search import coarse, shards, sweep
from qinco_jax.search.index import Index, load_index
from qinco_jax.search.workdir import SearchWorkdir

STAGES = ("ivf", "train", "encode", "build", "search")


class JobError(ValueError):
  """A setting or a workdir the job refuses (`qinco-search` prints it in one line)."""
# File names under --root of each data set, in its two distributions: TEXMEX's vecs
# files and big-ann-benchmarks' bin files; learn, base, queries, ground truth.
FILES = {
    "bigann": {
        "vecs": ("bigann_learn.bvecs", "bigann_base.bvecs", "bigann_query.bvecs",
                 "gnd/idx_1000M.ivecs"),
        "bin": ("learn.100M.u8bin", "base.1B.u8bin", "query.public.10K.u8bin",
                "GT.public.1B.ibin")},
    "deep1b": {
        "vecs": ("learn.fvecs", "base.fvecs", "deep1B_queries.fvecs",
                 "deep1B_groundtruth.ivecs"),
        "bin": ("learn.350M.fbin", "base.1B.fbin", "query.public.10K.fbin",
                "groundtruth.public.10K.ibin")},
}
ALIASES = {"bigann1b": "bigann"}  # the earlier name of --data=bigann


def data_files(name: str, root: str) -> tuple[str, ...]:
  """Paths of (learn, base, queries, ground truth) of data set `name` under root: the
  distribution whose base file is there (vecs first)."""
  layouts = FILES[ALIASES.get(name, name)]
  for files in layouts.values():
    if os.path.isfile(os.path.join(root, files[1])):
      return tuple(os.path.join(root, f) for f in files)
  tried = " or ".join(repr(f[1]) for f in layouts.values())
  raise FileNotFoundError(f"--data={name}: {root!r} holds neither base file ({tried})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchJob:
  """One run of the search job. Every field with a help text is a `qinco-search` flag
  of the same name (`cli.search` declares them from these fields). The defaults are a
  short GloVe run (6 epochs, encoding at the training beam); the run of
  docs/benchmarks.md's search section is the config `qinco_jax/configs/search_glove.py`
  (`--config=search_glove`: its command, run time and result)."""

  workdir: str = flag("runs/search_glove", "all stages read and write here")
  stage: str = flag("all", f"stage to run: one of {', '.join(STAGES)}, or all (which "
                    "skips the stages finished here with the same settings)")
  data: str = flag("glove", "dataset: glove, " + " or ".join(FILES) + " (vecs or bin "
                   "files under --root)")
  root: str = flag("", "directory of the BigANN/Deep1B files")
  ivf_K: int = flag(1024, "IVF lists (2**20 for 1B databases)")
  K: int = flag(256, "codewords per step: 256 (8-bit codes) or 16 (4-bit codes, whose "
                 "index scans them with faiss's fast-scan)")
  M: int = flag(8, "QINCo codes per vector (M bytes at K=256, M / 2 at K=16)")
  L: int = flag(2, "residual blocks per step network (train stage)")
  de: int = flag(64, "embedding width E (train stage)")
  dh: int = flag(128, "hidden width H (train stage)")
  epochs: int = flag(6, "training epochs, the warm-up epoch included")
  time_budget_s: float = flag(0.0, "training wall-time budget in seconds (0: use "
                              "--epochs); the cosine then ends with the budget "
                              "(TrainConfig.time_budget_s)")
  stop_patience: int = flag(3, "train stage: stop after more than this many epochs "
                            "without a validation improvement (raise it for short epochs)")
  A: int = flag(4, "candidates per beam for training (and encoding by default)")
  B: int = flag(4, "beam size for training (and encoding by default)")
  enc_A: int = flag(-1, "encode/build stages: candidates per beam (-1: --A)")
  enc_B: int = flag(-1, "encode/build stages: beam size (-1: --B)")
  shard: tuple[int, int] = flag((0, 1), "encode stage: shard i/n of the database")
  shard_rows: int = flag(1 << 22, "encode stage: rows per shard file at most (each is "
                         "encoded, resumed and built as one: the build holds one in memory)")
  ef_construction: int = flag(coarse.EF_CONSTRUCTION, "ivf stage: efConstruction of the "
                              "HNSW list search (above 4096 lists)")
  max_experiments: int = flag(24, "search stage: settings measured at most")
  command: str = ""  # recorded in command.{stage}.txt (what built the workdir)
  # The fields set on purpose (qinco-search: the flags given); None: those that
  # differ from their defaults. The others take what the workdir's earlier stages
  # used (`reconcile`).
  given: frozenset[str] | None = None

  def __post_init__(self):
    if self.stage not in STAGES + ("all",):
      raise ValueError(f"stage must be one of {STAGES + ('all',)}, got {self.stage!r}")
    if self.data not in ("glove",) + tuple(FILES) + tuple(ALIASES):
      raise ValueError(f"data must be glove, {' or '.join(FILES)}, got {self.data!r}")
    if self.data != "glove" and not self.root:
      raise ValueError(f"data={self.data!r} needs root (the directory of its files)")
    i, n = self.shard
    if not 0 <= i < n:
      raise ValueError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")
    for name in ("ivf_K", "K", "M", "L", "dh", "de", "epochs", "B", "shard_rows",
                 "ef_construction", "max_experiments"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name, low in (("A", 0), ("stop_patience", 0), ("enc_A", -1), ("enc_B", -1),
                      ("time_budget_s", 0)):
      if getattr(self, name) < low:
        raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
    if self.enc_B == 0:
      raise ValueError("enc_B must be >= 1 (or -1: --B), got 0")


def load_data(job: SearchJob, need_gt: bool):
  """(train, val, database, queries, gt); gt is None unless need_gt (only the search
  stage needs it: the other stages run without faiss). The BigANN/Deep1B learn
  file's last 10k rows (a tenth of a smaller file) are the validation set, held out
  once. GloVe's database is its 90k database plus the 290k training vectors."""
  if job.data == "glove":
    ds = data.load_glove(with_gt=False)
    db = np.concatenate([np.asarray(ds.db), np.asarray(ds.train)])
    assert ds.queries is not None  # GloVe has its 10k queries
    gt = data.cached_gt(db, ds.queries, 100, tag="glove_search_db") if need_gt else None
    return ds.train, ds.val, db, ds.queries, gt
  paths = data_files(job.data, job.root)
  learn, db, queries = (data.read_vecs(p) for p in paths[:3])
  train_x, val = data.split_train_val(learn, min(10_000, len(learn) // 10))
  gt = None
  if need_gt:
    gt = np.asarray(data.read_vecs(paths[3]), np.int64)
    if gt.shape[0] != len(queries):
      raise JobError(f"ground truth {paths[3]!r} has {gt.shape[0]} rows for "
                       f"{len(queries)} queries")
    if gt.min() < 0 or gt.max() >= len(db):
      raise JobError(f"ground truth {paths[3]!r} holds ids {gt.min()}..{gt.max()}, "
                       f"outside the database's 0..{len(db) - 1}: it belongs to another "
                       "database (or a prefix of this one)")
  return train_x, val, db, queries, gt


def where_it_ran() -> str:
  dev = jax.devices()[0]
  kind = "CPU" if dev.platform == "cpu" else dev.device_kind
  return f"on {kind} x{jax.device_count()}, {os.cpu_count()} CPUs, jax {jax.__version__}"


# The settings each stage records in the workdir (`WORKDIR/job.json`): a later stage
# takes them over, and a setting given against them is refused.
STAGE_FIELDS = {"ivf": ("data", "root", "ivf_K", "ef_construction"),
                "train": ("K", "M", "L", "de", "dh", "A", "B"),
                "encode": ("enc_A", "enc_B", "shard_rows"), "build": (), "search": ()}


def _given(job: SearchJob) -> frozenset[str]:
  if job.given is not None:
    return job.given
  default = SearchJob()
  return frozenset(f.name for f in dataclasses.fields(job)
                   if getattr(job, f.name) != getattr(default, f.name))


def reconcile(job: SearchJob) -> SearchJob:
  """The job with the settings the workdir's earlier stages recorded: a setting not
  given takes the recorded value; one given against it is refused (one line naming
  both), unless it is for the stage being rerun and no later stage used it yet."""
  rec = SearchWorkdir(job.workdir).read_record()
  runs = STAGES if job.stage == "all" else (job.stage,)
  given, updates = _given(job), {}
  for k, (stage, fields) in enumerate(STAGE_FIELDS.items()):
    done = rec.get(stage)
    if not done:
      continue
    later = [s for s in STAGES[k + 1:] if s in rec]
    for f in fields:
      want, used = getattr(job, f), done.get(f, getattr(job, f))
      if want == used:
        continue
      if f not in given:
        updates[f] = used
      elif stage not in runs or later:
        by = f"the {stage} stage" + (f" (and then {', '.join(later)})" if later else "")
        raise JobError(f"--{f}={want}: {by} of {job.workdir} used {f}={used}; leave it "
                         f"out to keep it, or use a new --workdir")
  return dataclasses.replace(job, **updates) if updates else job


def run(job: SearchJob):
  """Runs the job's stage(s) (see the module docstring). With stage="all", a stage
  that finished here earlier with the same settings (`WORKDIR/job.json`) is skipped,
  so a killed job run again goes on from the stage it was in (which itself resumes:
  the encode stage at its first unfinished shard, the build at its first missing run,
  the training from its checkpoint, the sweep from its log); once a stage runs, every
  later one runs too. A stage named on its own (`--stage=ivf`) always runs."""
  main_process = distributed.is_main()
  wd = SearchWorkdir(job.workdir)
  job = reconcile(job)
  stages = STAGES if job.stage == "all" else (job.stage,)
  done = wd.read_record() if job.stage == "all" else {}
  for stage in stages:
    if _finished(wd, stage, done, job):
      print(f"{stage}: finished earlier in {job.workdir} (job.json), skipped; run "
            f"--stage={stage} to redo it", flush=True)
      continue
    done = {}  # this stage runs: so do the later ones
    _run_stages(job, wd, main_process, (stage,))
    if main_process:  # what built this workdir (bench_search quotes it)
      with open(wd.command(stage), "w") as f:
        f.write(f"{job.command}  # {where_it_ran()}\n")
      wd.record(stage, _settings(job, stage))


def _finished(wd: SearchWorkdir, stage: str, done: dict, job: SearchJob) -> bool:
  """Whether `stage` finished here with the job's settings: recorded in job.json
  (`done`) and, for encode (recorded by the first of several --shard jobs to finish),
  every shard of the split written."""
  if done.get(stage) != _settings(job, stage):
    return False
  if stage == "encode":
    try:
      shards.find_shards(wd.root, wd.codes)
    except (OSError, ValueError):
      return False
  return True


def _settings(job: SearchJob, stage: str) -> dict:
  """What `stage` records in job.json (JSON types: tuples as lists)."""
  return json.loads(json.dumps({f: getattr(job, f) for f in STAGE_FIELDS[stage]}))


NEEDS = {"train": ("centroids", "ivf"), "encode": ("model", "train"),
         "build": ("model", "train"), "search": ("index", "build")}


def _run_stages(job: SearchJob, wd: SearchWorkdir, main_process: bool, stages):
  if main_process:
    os.makedirs(job.workdir, exist_ok=True)
  for stage in stages:
    if stage in NEEDS:
      what, before = NEEDS[stage]
      if not getattr(wd, what).exists():
        raise JobError(f"--stage={stage} needs {str(getattr(wd, what))!r}, which "
                                f"the {before} stage writes: run --stage={before} first")
  train_x, val, db, queries, gt = load_data(job, "search" in stages and main_process)
  if "ivf" in stages and main_process:
    coarse.train_ivf(train_x, job.ivf_K, job.workdir, max_points=256 * job.ivf_K,
                     ef_construction=job.ef_construction, verbose=True)
  distributed.barrier("ivf")
  if "train" in stages:
    _train(job, train_x, val, wd)
  codec = load(wd.model) if (
      set(stages) & {"encode", "build"}) else None
  enc_A = job.A if job.enc_A < 0 else job.enc_A
  enc_B = job.B if job.enc_B < 0 else job.enc_B
  if "encode" in stages:
    i, n = job.shard
    if jax.process_count() > 1:
      if (i, n) != (0, 1):
        raise ValueError("shard splits the database between independent jobs; a "
                         "multi-process run splits it by process already")
      i, n = jax.process_index(), jax.process_count()
    # Job i of n encodes rows shard_range(N, i, n), as `per` files of at most
    # shard_rows rows each (the same split whichever job computes it).
    rows_per_job = -(-len(db) // n)
    per = max(1, -(-rows_per_job // job.shard_rows))
    kw = _encode_kw(wd, enc_B)
    for s in range(i * per, (i + 1) * per):
      shards.encode_shard(codec, db, job.workdir, s, n * per, A=enc_A, B=enc_B,
                          verbose=True, encode_kw=kw)
  distributed.barrier("encode")
  if not main_process:
    return  # build and search: process 0
  if "build" in stages:
    found = shards.find_shards(job.workdir, db=db, codec=codec)
    train_codes = None
    if job.data == "glove":  # the database ends with the training set: reuse its codes
      train_codes = np.concatenate([c for p, meta in found[-1:] for _, c in
                                    shards.iter_shard(p, meta)])
      if len(train_codes) < len(train_x):
        train_codes = shards.load_shards(job.workdir, db=db, codec=codec)
      train_codes = train_codes[len(train_codes) - len(train_x):]
    index = Index(codec, A=enc_A, B=enc_B, coarse=coarse.load_coarse(wd.coarse)
                  if wd.coarse.exists() else "auto")
    index.train(train_x, codes=train_codes, verbose=True)
    index.add_shards(found, wd.index, verbose=True)
    print(f"built {index} in {wd.index}", flush=True)
  if "search" in stages:
    _search(job, queries, gt, wd)


def _encode_kw(wd: SearchWorkdir, B: int) -> dict:
  """The encoder's IVF candidates from the ivf stage's list search, when it is a graph
  (an exact one: the encoder's own exhaustive step is as fast)."""
  if not wd.coarse.exists():
    return {}
  index = coarse.load_coarse(wd.coarse)
  if coarse.is_exact(index):
    return {}
  return {"ivf_candidates": coarse.candidates(index, max(1, B), coarse.ENCODE_EF_SEARCH)}


def _train(job: SearchJob, train_x, val, wd: SearchWorkdir):
  cfg = preset("qinco2-S", K=job.K, M=job.M, L=job.L, de=job.de, dh=job.dh, A=job.A,
               B=job.B, ivf_K=job.ivf_K)
  budget = job.time_budget_s if job.time_budget_s > 0 else None
  tc = train.TrainConfig(epochs=job.epochs, warmup_epochs=1,
                         stop_patience=job.stop_patience,
                         loop=min(len(train_x), 10_000_000), time_budget_s=budget)
  ds = data.Dataset("train", train_x, val, None, None, None, 1.0)
  trainer.train_and_evaluate(cfg, tc, ds, wd.model, resume=True,
                             ivf_centroids=ivf.load_centroids(wd.centroids))


def _search(job: SearchJob, queries, gt, wd: SearchWorkdir):
  index = load_index(wd.index)
  searcher = index.searcher()
  log = wd.sweep_log
  label = {"index": index.fingerprint}  # records of an earlier index are not reused
  front = sweep.run_sweep(searcher, queries, gt, log, max_experiments=job.max_experiments,
                          label=label)
  front.sort(key=lambda r: r["ms_per_query"]["total"])
  n_run = len(sweep.read_log(log, label))
  png = wd.sweep_plot
  plots.speed_recall(
      {"Pareto front": [(1e3 / r["ms_per_query"]["total"], r["R@1"]) for r in front]},
      path=png, title=f"IVF-QINCo2 search sweep ({n_run} settings measured)")
  print(f"Pareto front of {n_run} settings measured (all in {log}; plot {png}):")
  for r in front:
    print(f"  {json.dumps(r['params'])}: R@1 {r['R@1']:.4f} R@10 {r['R@10']:.4f} "
          f"{r['ms_per_query']['total']:.3f} ms/query")
  sys.stdout.flush()
