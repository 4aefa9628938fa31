"""Search benchmark on the GloVe default: IVF-QINCo2 pipeline vs faiss IVF-RQ / IVF-PQ.

Run by experiments/bench_search.py after experiments/search_bigann.py has built the
workdir (their docstrings: usage).

Measures, in one run and on the same 380k database / 10k queries: R@1, R@10 and
queries per second for the 8-byte faiss indexes of `faiss_keys` (trained on the same
training vectors; faiss at one fixed thread count for every index, ours included), and
for our 8-bit index (K = 256, M = 8) with (b) AQ distances only, (c) + pairwise
shortlist, (d) + QINCo2 re-rank, and our 4-bit index (K = 16, M = 16: the fast-scan
first stage) when --workdir_k16 holds one; plus a Table-4-style comparison of R@1 after QINCo2
re-ranking of a 10- and 100-element shortlist chosen by AQ, by the pairwise decoder, or
by full QINCo2 decoding of a 10x longer AQ list. Our operating points come from two
sources: fixed settings per stage ((b)-(d)), and "ours (tuned)": the Pareto-optimal
settings of a `qinco_jax.search.sweep` over nprobe, efSearch, nshort and nmid_short run on
held-out *validation* vectors as queries (not the test queries), then re-timed on the
test queries, one sweep per index, then the Pareto front of both. The equal-speed table
compares, at each speed from 5k to 200k queries/s, the best of the anchors with the
best of ours. Writes its section of docs/benchmarks.md and docs/speed_recall.png.

`--lever=fastscan` measures one lever only, in its own section: a faiss fast-scan
(4-bit PQ) first stage whose candidates QINCo2 re-ranks, next to faiss's fast-scan and
PQ8 indexes alone.
"""

import dataclasses
import datetime
import importlib.metadata
import json
import os
import time
from typing import Any

import faiss
import numpy as np

import qinco_jax as qj
from qinco_jax import plots
from qinco_jax.bench.harness import DOC, RUNS, log, write_section
from qinco_jax.config import flag
from qinco_jax.search import SearchParams, load_index, shards, sweep
from qinco_jax.search.lists import IVFIndex
from qinco_jax.search.workdir import SearchWorkdir

START, END = "<!-- bench_search:start -->", "<!-- bench_search:end -->"


def timed_curve(search, queries, gt, nprobes):
  """R@k and queries per second of `search(nprobe) -> I (nq, <= 100)` for each nprobe."""
  rows = []
  search(nprobes[0])  # warm-up: compiles our decoder for this shortlist size
  for nprobe in nprobes:
    t0 = time.perf_counter()
    I = search(nprobe)
    qps = len(queries) / (time.perf_counter() - t0)
    rows.append({"nprobe": nprobe, "qps": qps,
                 **qj.metrics.recall_at(sweep.pad_results(I), gt)})
  return rows


def faiss_index(key, train, db):
  """The faiss index `key` trained on `train` and holding `db`, and its build seconds."""
  index = faiss.index_factory(db.shape[1], key)
  t0 = time.perf_counter()
  index.train(train)
  index.add(db)
  return index, time.perf_counter() - t0


def faiss_curve(index, queries, gt, nprobes):
  """R@k and qps of a faiss IVF index for each nprobe (qps_k1: timed for 1 result)."""
  def search(nprobe, k=100):
    faiss.extract_index_ivf(index).nprobe = nprobe
    return index.search(queries, k)[1]
  return anchor_curve(search, queries, gt, nprobes)


def anchor_curve(search, queries, gt, nprobes):
  """`timed_curve` of an anchor's `search(nprobe, k=100) -> I`, plus qps_k1: its
  timing for 1 result. Our fast settings return nshort results; the anchors are timed
  for 1 result as well, and the equal-speed comparison uses the faster timing."""
  rows = timed_curve(search, queries, gt, nprobes)
  for r, r1 in zip(rows, timed_curve(lambda n: search(n, 1), queries, gt, nprobes)):
    r["qps_k1"] = r1["qps"]
  return rows


def ours_curve(searcher, queries, gt, nprobes, **kw):
  def search(nprobe):
    p = SearchParams(nprobe=nprobe, ef_search=max(32, 2 * nprobe), **kw)
    return searcher.search(queries, k=sweep.results_asked(p), params=p)[1]
  return timed_curve(search, queries, gt, nprobes)


TUNE_RANGES = {
    "nprobe": [1, 2, 4, 8, 16, 32, 64, 128],
    "ef_search": [16, 32, 64, 128, 256],
    "nshort": [1, 2, 4, 10, 20, 50, 100],
    "nmid_short": [1, 2, 4, 8],  # 1: no pairwise stage (the AQ list is the shortlist)
}


def tuned_curve(searcher, db, tune_q, queries, gt, log_path, resume=False):
  """Pareto-optimal settings of a sweep on `tune_q`, re-timed on the test queries."""
  if not resume and os.path.exists(log_path):
    os.remove(log_path)
  tune_gt = qj.data.cached_gt(db, tune_q, 100, tag="glove_search_tune")
  front = sweep.run_sweep(searcher, tune_q, tune_gt, log_path, ranges=TUNE_RANGES,
                          verbose=False)
  rows = []
  for rec in sorted(front, key=lambda r: r["ms_per_query"]["total"]):
    p = SearchParams(**rec["params"])
    k = sweep.results_asked(p)
    searcher.search(queries[:256], k=k, params=p)  # compile this shortlist size
    t0 = time.perf_counter()
    I = searcher.search(queries, k=k, params=p)[1]
    qps = len(queries) / (time.perf_counter() - t0)
    rows.append({"params": rec["params"], "qps": qps,
                 **qj.metrics.recall_at(sweep.pad_results(I), gt)})
  return rows


def exhaustive_ceiling(searcher, workdir, db, queries, gt):
  """R@k of an exact L2 search over the full QINCo2 decoding of every database code:
  the best any IVF / shortlist setting can do with these codes."""
  dec = searcher.codec.decode(shards.load_shards(workdir), verbose=False)
  out = qj.metrics.recall_at(qj.data.compute_gt(dec, queries, 100), gt)
  out["db_mse"] = qj.metrics.mse(db, dec)
  return out


def faiss_keys(K_ivf: int) -> list[str]:
  """The 8-byte faiss indexes a speed-minded user would pick: RQ (our codes' family),
  OPQ + PQ8, and the two 4-bit fast-scan families by residual (PQ16x4fsr; additive
  RQ14x4fsr with a 2 x 4-bit norm). PQ needs D % M == 0: GloVe's 50 dims are rotated
  (OPQ) to 48."""
  return [f"IVF{K_ivf},RQ8x8", f"OPQ8_48,IVF{K_ivf},PQ8", f"OPQ16_48,IVF{K_ivf},PQ16x4fsr",
          f"IVF{K_ivf},RQ14x4fsr_Nrq2x4"]


# ScaNN (optional, when importable): its tree of K_IVF leaves and asymmetric hashing
# of about 8 bytes, anisotropic loss threshold 0.2, no re-ordering. GloVe's 50 dims
# split into blocks of 3 (17 x 4-bit codes, 8.5 bytes) or 7 (8 x 8-bit, 8 bytes).
SCANN = {"AH 17 x 4-bit (lut16, 8.5 B)": (3, "lut16"), "AH 8 x 8-bit (lut256, 8 B)": (7, "lut256")}


def scann_curves(K_ivf, train, db, queries, gt, nprobes) -> dict[str, list[dict]]:
  """R@k and qps of ScaNN's partitioned asymmetric-hashing searchers (`SCANN`), timed
  as faiss's (100 results and 1) with `search_batched_parallel`; {} when ScaNN is not
  installed (it is not a dependency)."""
  try:
    import scann  # type: ignore[import-not-found]
  except ImportError:
    return {}
  out = {}
  for name, (dims, hash_type) in SCANN.items():
    s = scann.scann_ops_pybind.builder(db, 100, "squared_l2").tree(
        num_leaves=K_ivf, num_leaves_to_search=16, training_sample_size=len(train)).score_ah(
        dims, anisotropic_quantization_threshold=0.2, hash_type=hash_type).build()

    def search(nprobe, k=100, s=s):
      return s.search_batched_parallel(queries, final_num_neighbors=k,
                                       leaves_to_search=nprobe)[0].astype(np.int64)
    rows = anchor_curve(search, queries, gt, nprobes)
    out[f"ScaNN {importlib.metadata.version('scann')}, tree {K_ivf}, {name}"] = rows
  return out


def reranked_keys(K_ivf: int) -> dict[str, float]:
  """Anchors of another memory budget: an 8-byte fast-scan stage whose candidates
  (k_factor x k) are re-ranked by int8 copies of the vectors (8 + 50 = 58 bytes), as
  {key: k_factor}."""
  return {f"IVF{K_ivf},RQ14x4fsr_Nrq2x4,Refine(SQ8)": 10.0}


def pareto(rows: list[dict]) -> list[dict]:
  """The rows no other row beats in both R@1 and qps, fastest first."""
  out, best = [], -1.0
  for r in sorted(rows, key=lambda r: (-r["qps"], -r["R@1"])):
    if r["R@1"] > best:
      out.append(r)
      best = r["R@1"]
  return out


SPEEDS = [5_000, 10_000, 20_000, 50_000, 100_000, 200_000]


def equal_speed_table(curves: dict[str, list[dict]], anchors: list[str],
                      speeds=SPEEDS) -> list[dict]:
  """For each speed s: the best R@1 of the 8-byte anchors among their points at least
  s queries/s fast (faiss qps: the faster of its timings for 100 results and for 1),
  ours among ours at least as fast, and their ratio (None where one side has nothing
  that fast)."""
  def best(rows, s):
    fast = [r for r in rows if max(r["qps"], r.get("qps_k1", 0.0)) >= s]
    return max(fast, key=lambda r: r["R@1"]) if fast else None
  ours = [r for name, rows in curves.items() if name.startswith("ours") for r in rows]
  theirs = [dict(r, index=name) for name in anchors for r in curves[name]]
  out = []
  for s in speeds:
    o, t = best(ours, s), best(theirs, s)
    out.append({"qps": s, "ours": o and o["R@1"], "anchor": t and t["R@1"],
                "anchor_name": t and t["index"], "ratio": (o["R@1"] / t["R@1"]) if (
                    o and t) else None})
  return out


def equal_qps_ratios(curves, faiss_name):
  """For each point of the faiss curve `faiss_name`: our best R@1 among the points at
  least as fast (over all our curves), and the ratio to faiss' R@1 (None where we have
  no point that fast)."""
  ours = [r for name, rows in curves.items() if name.startswith("ours") for r in rows]
  out = []
  for f in curves[faiss_name]:
    f_qps = max(f["qps"], f.get("qps_k1", 0.0))
    fast = [r for r in ours if r["qps"] >= f_qps]
    best = max(fast, key=lambda r: r["R@1"]) if fast else None
    out.append({"nprobe": f["nprobe"], "qps": f_qps, "faiss_R@1": f["R@1"],
                "ours_R@1": best["R@1"] if best else None,
                "ours_qps": best["qps"] if best else None,
                "ratio": best["R@1"] / f["R@1"] if best else None})
  return out


def aq_stage_costs(searcher, queries):
  """Microseconds per query of the AQ stage's parts at nprobe 1 (what bounds the fast
  end): the look-up table alone (every probed list skipped), and the whole stage
  (coarse search, table, scan) for 1 and for 100 results."""
  ivf = searcher.index
  skip = -np.ones((len(queries), 1), np.int64)
  lifted = np.zeros((len(queries), ivf.scanner.d), np.float32)  # its values do not matter
  ivf.scanner.nprobe = 1
  parts = {"table": lambda: ivf.scanner.search_preassigned(lifted, 1, skip, None),
           "stage_k1": lambda: ivf.search(queries, 1, 1, 16),
           "stage_k100": lambda: ivf.search(queries, 100, 1, 16)}
  out = {}
  for name, f in parts.items():
    f()
    t0 = time.perf_counter()
    f()
    out[name] = 1e6 * (time.perf_counter() - t0) / len(queries)
  return out


FS_START, FS_END = "<!-- bench_search_fastscan:start -->", "<!-- bench_search_fastscan:end -->"


def fastscan_rerank_curve(searcher, index, queries, gt, nprobes, shortlists, batch=1024):
  """The 4-bit first-stage lever, measured: a faiss fast-scan `index` over the raw
  database (its own 8 bytes per vector, beside our 8) returns S candidates per query,
  which the full QINCo2 decoding of their stored codes re-ranks. Time per query = the
  fast-scan search + the re-rank, both over batches of `batch` queries as the
  pipeline runs them."""
  ivf, codec = searcher.index, searcher.codec
  stored = ivf.rows()  # (read once: the index may be memory-mapped)
  row_of = np.empty(int(stored["ids"].max()) + 1, np.int64)
  row_of[stored["ids"]] = np.arange(ivf.ntotal)

  def search(nprobe, S):
    faiss.extract_index_ivf(index).nprobe = nprobe
    out = np.empty((len(queries), min(S, 100)), np.int64)
    for s in range(0, len(queries), batch):
      q = queries[s:s + batch]
      I = index.search(q, S)[1]
      r = row_of[np.maximum(I, 0)]
      full = np.concatenate([stored["lists"][r][..., None].astype(np.int64),
                             stored["codes"][r].astype(np.int64)], 2).reshape(-1, ivf.M + 1)
      x_hat = codec.decode(full, verbose=False).reshape(len(q), S, -1)
      d = ((x_hat - q[:, None]) ** 2).sum(-1)
      d[I < 0] = np.inf
      out[s:s + batch] = np.take_along_axis(I, np.argsort(d, 1)[:, :out.shape[1]], 1)
    return out

  rows = []
  for S in shortlists:
    for r in timed_curve(lambda n: search(n, S), queries, gt, nprobes):
      rows.append({"S": S, **r})
  return rows


def fastscan_lever(args, searcher, train, db, queries, gt, K_ivf):
  """`--lever=fastscan`: the fast-scan first stage + QINCo2 re-rank against faiss's
  fast-scan and PQ8 indexes alone, timed side by side; its own section of the doc."""
  nprobes, shortlists = [1, 2, 4, 8], [2, 4, 10]
  fs_key = f"OPQ16_48,IVF{K_ivf},PQ16x4fs"
  indexes = {k: faiss_index(k, train, db)[0] for k in (fs_key, f"OPQ8_48,IVF{K_ivf},PQ8")}
  curves = {k: faiss_curve(index, queries, gt, nprobes) for k, index in indexes.items()}
  # faiss's own answer at 16 bytes: the fast-scan stage refined by a second, 8-byte RQ
  # code of the raw vectors, re-ranking k_factor x k candidates (k_factor = S for one
  # result).
  refine_key = f"{fs_key},Refine(RQ8x8)"
  refined = faiss_index(refine_key, train, db)[0]
  refine = faiss.downcast_index(refined)  # an IndexRefine around the OPQ + IVF index

  def refined_search(nprobe):  # one result: R@1 of exactly S re-ranked candidates
    faiss.extract_index_ivf(refined).nprobe = nprobe
    return refined.search(queries, 1)[1]

  for S in shortlists:
    refine.k_factor = float(S)
    rows = timed_curve(refined_search, queries, gt, nprobes)
    curves[f"{refine_key} k_factor={S}"] = [dict(r, qps_k1=r["qps"]) for r in rows]
  lever = fastscan_rerank_curve(searcher, indexes[fs_key], queries, gt, nprobes,
                                shortlists)
  lines = [FS_START, "### The 4-bit first stage, measured (`--lever=fastscan`)", "",
           f"`python experiments/bench_search.py --workdir={args.workdir} --nq={args.nq} "
           f"--lever=fastscan` (same workdir, database and queries as above; "
           f"{datetime.date.today()}, 2-core CPU). A faiss {fs_key} index over the raw "
           "database chooses S candidates per query; the full QINCo2 decoding of their "
           "8-byte codes re-ranks them. This stores 16 bytes per vector (8 fast-scan + 8 "
           "QINCo2), so it is not an 8-byte index; it answers whether a fast-scan first "
           "stage would win the fast end if the bytes were free. faiss's own 16-byte "
           f"answer is timed beside it: {refine_key}, the fast-scan candidates "
           "(k_factor x k of them) re-ranked by a second, 8-byte RQ code (faiss's default "
           "RQ training) of the raw vectors. faiss qps: the "
           "faster of 100 and 1 results.", "",
           "| method | " + " | ".join(f"nprobe {n}" for n in nprobes) + " |",
           "|---|" + "---|" * len(nprobes)]
  for k, rows in curves.items():
    lines.append(f"| faiss {k} | " + " | ".join(
        f"{r['R@1']:.3f} @ {max(r['qps'], r['qps_k1']):,.0f} qps" for r in rows) + " |")
  for S in shortlists:
    rows = [r for r in lever if r["S"] == S]
    lines.append(f"| {fs_key.split(',')[-1]} S={S} -> QINCo2 re-rank | " + " | ".join(
        f"{r['R@1']:.3f} @ {r['qps']:,.0f} qps" for r in rows) + " |")
  def verdict(name):
    return "; ".join(
        f"nprobe {r['nprobe']}: " + (
            f"{r['ratio']:.2f}x ({r['ours_R@1']:.3f} at {r['ours_qps']:,.0f} qps against "
            f"{r['faiss_R@1']:.3f} at {r['qps']:,.0f})" if r["ratio"] else
            f"nothing this fast ({r['qps']:,.0f} qps)")
        for r in equal_qps_ratios({name: curves[name], "ours lever": lever}, name))

  lines += ["", "The fast-scan + QINCo2 re-rank rows (any S) at equal or higher speed:"]
  lines += [f"- against {k}: {verdict(k)}." for k in curves if k != fs_key]
  lines.append(FS_END)
  block = "\n".join(lines)
  write_section(args.doc, block, FS_START, FS_END)
  print(block)


def build_commands(workdir):
  """The search_bigann.py command lines that built the workdir (saved per stage)."""
  cmds = []
  for stage in ("all", "ivf", "train", "encode", "build", "search"):
    p = SearchWorkdir(workdir).command(stage)
    if os.path.exists(p):
      cmds.append(open(p).read().strip())
  return cmds or [f"python experiments/search_bigann.py --workdir={workdir}"]


def plot_title(n_db: int, nq: int) -> str:
  return f"GloVe, {n_db:,} vectors in 8 bytes\n{nq:,} queries, 2-core CPU"


@dataclasses.dataclass(frozen=True)
class SearchBench:
  """What `run` measures (flags of experiments/bench_search.py)."""
  workdir: str = os.path.join(RUNS, "search_glove")
  workdir_k16: str = flag(os.path.join(RUNS, "search_glove_k16"), "workdir of the 4-bit "
                          "index (search_bigann.py --K=16 --M=16); left out if it holds none")
  nq: int = flag(10_000, "queries used")
  n_faiss_train: int = 100_000
  n_tune: int = flag(2000, "validation vectors used as queries by the parameter sweep")
  resume_tune: bool = flag(False, "reuse the sweep log of an earlier run (its timings "
                           "included)")
  threads: int = flag(0, "OpenMP threads of faiss for every index, ours included (0: "
                      "one per CPU)")
  doc: str = DOC
  lever: str | None = flag(None, "measure one lever only and write its own section: "
                           "fastscan = a faiss fast-scan first stage re-ranked by QINCo2")

  def __post_init__(self):
    if self.lever not in (None, "fastscan"):
      raise ValueError(f"lever: expected 'fastscan' or none, got {self.lever!r}")


def run(args: SearchBench, command: str) -> None:
  """Times faiss and our indexes on the workdirs' database; writes the doc section."""
  log(command)
  threads = args.threads or os.cpu_count() or 1
  faiss.omp_set_num_threads(threads)  # every index below, ours included, scans with these
  ds = qj.data.load_glove()
  db = np.concatenate([np.asarray(ds.db), np.asarray(ds.train)])
  assert ds.queries is not None  # load_glove has queries
  gt = qj.data.cached_gt(db, ds.queries, 100, tag="glove_search_db")[: args.nq]
  queries = np.ascontiguousarray(ds.queries[: args.nq], np.float32)
  wd = SearchWorkdir(args.workdir)
  searcher = load_index(wd.index).searcher()
  K_ivf = searcher.centroids.shape[0]
  nprobes = [1, 2, 4, 8, 16, 32]
  curves: dict[str, list[dict]] = {}
  other: dict[str, list[dict]] = {}  # anchors of another memory budget
  build = {}
  train = np.ascontiguousarray(ds.train[: args.n_faiss_train], np.float32)
  if args.lever == "fastscan":
    return fastscan_lever(args, searcher, train, db, queries, gt, K_ivf)
  wd4 = SearchWorkdir(args.workdir_k16)
  four = load_index(wd4.index).searcher() if wd4.index.exists() else None
  for key in faiss_keys(K_ivf):
    index, build[key] = faiss_index(key, train, db)
    curves["faiss " + key] = faiss_curve(index, queries, gt, nprobes)
  for key, rows in scann_curves(K_ivf, train, db, queries, gt, nprobes).items():
    curves[key] = rows  # an 8-byte anchor, when ScaNN is installed
  for key, k_factor in reranked_keys(K_ivf).items():
    index, build[key] = faiss_index(key, train, db)
    refine: Any = faiss.downcast_index(index)  # an IndexRefine
    refine.k_factor = k_factor
    other[f"faiss {key} k_factor={k_factor:g}"] = faiss_curve(index, queries, gt, nprobes)
  curves["ours (b) AQ"] = ours_curve(searcher, queries, gt, nprobes, nshort=100,
                                     use_pairwise=False, use_qinco=False)
  curves["ours (c) + pairwise"] = ours_curve(searcher, queries, gt, nprobes, nshort=100,
                                             nmid_short=4, use_qinco=False)
  curves["ours (d) + QINCo2 re-rank"] = ours_curve(searcher, queries, gt, nprobes,
                                                   nshort=20, nmid_short=4)
  if four is not None:
    curves["ours 4-bit (b) fast-scan"] = ours_curve(four, queries, gt, nprobes, nshort=100,
                                                    use_pairwise=False, use_qinco=False)
    curves["ours 4-bit (d) + QINCo2 re-rank"] = ours_curve(four, queries, gt, nprobes,
                                                           nshort=20, nmid_short=4)
  tune_q = np.ascontiguousarray(ds.val[: args.n_tune], np.float32)
  tuned = [dict(r, index="8-bit") for r in tuned_curve(
      searcher, db, tune_q, queries, gt, wd.tune_log, args.resume_tune)]
  if four is not None:
    tuned += [dict(r, index="4-bit") for r in tuned_curve(
        four, db, tune_q, queries, gt, wd4.tune_log, args.resume_tune)]
  curves["ours (tuned)"] = pareto(tuned)
  table4: dict[int, dict[str, float]] = {}
  for S in (1, 10, 100):
    base: dict[str, Any] = dict(nprobe=16, ef_search=64, nshort=S)
    sel = {"AQ": SearchParams(**base, use_pairwise=False),
           "pairwise": SearchParams(**base, nmid_short=10),
           "full QINCo2 (10x AQ list)": SearchParams(**{**base, "nshort": 10 * S},
                                                     use_pairwise=False)}
    table4[S] = {}
    for name, p in sel.items():
      _, I, _ = searcher.search(queries, k=p.nshort, params=p)
      table4[S][name] = qj.metrics.recall_at(I, gt, ks=(1,))["R@1"]
  ceiling = {"8-bit": exhaustive_ceiling(searcher, args.workdir, db, queries, gt)}
  if four is not None:
    ceiling["4-bit"] = exhaustive_ceiling(four, args.workdir_k16, db, queries, gt)
  ivf = searcher.index
  assert isinstance(ivf, IVFIndex)  # the 8-bit index
  costs = {"us": aq_stage_costs(searcher, queries), "n_sub": ivf.scanner.pq.M,
           "D": db.shape[1]}  # PQ sub-quantisers
  anchors = [k for k in curves if not k.startswith("ours")]
  ratios = {k: equal_qps_ratios(curves, k) for k in anchors}
  speeds = equal_speed_table(curves, anchors)
  os.makedirs(os.path.dirname(args.doc) or ".", exist_ok=True)
  png = os.path.join(os.path.dirname(args.doc), "speed_recall.png")
  plots.speed_recall({k: [(max(r["qps"], r.get("qps_k1", 0.0)), r["R@1"]) for r in v]
                      for k, v in {**curves, **other}.items()},
                     path=png, title=plot_title(len(db), len(queries)))
  with open(wd.bench, "w") as f:
    json.dump({"curves": curves, "other_budget": other, "table4": table4, "build_s": build,
               "equal_qps": ratios, "equal_speed": speeds, "ceiling": ceiling,
               "aq_stage": costs, "threads": threads}, f, indent=1)
  write_doc(args, curves, other, table4, K_ivf, len(db), ceiling, costs, ratios, speeds,
            ivf.exact_coarse, threads, four is not None)


def _anchor(name: str) -> str:
  return name.removeprefix("faiss ")


def _row(r: dict) -> str:
  qps = max(r["qps"], r.get("qps_k1", 0.0))
  return f"{r['R@1']:.3f} / {r['R@10']:.3f} @ {qps:,.0f} qps"


def write_doc(args, curves, other, table4, K_ivf, n_db, ceiling, costs, all_ratios, speeds,
              exact_coarse, threads, with_4bit):
  commands = build_commands(args.workdir) + (build_commands(args.workdir_k16)
                                             if with_4bit else [])
  flags = f" --workdir_k16={args.workdir_k16}" if with_4bit else ""
  first = next(iter(curves.values()))
  lines = [START, "## Search (experiments/bench_search.py)", "",
           f"Measured {datetime.date.today()}: every query timing on a 2-core CPU, faiss "
           f"and our pipelines in the same run, faiss at {threads} OpenMP threads for every "
           "index (ours scan with faiss too; ScaNN, when installed, searches with "
           "`search_batched_parallel`, one thread per CPU); the stages that built our "
           f"indexes ran where each command's comment says. GloVe: {n_db:,} database "
           f"vectors (90k db + 290k train), {args.nq:,} queries, {K_ivf} IVF lists, 8 "
           "bytes per vector: our 8-bit index codes M = 8 steps of K = 256" + (
               ", our 4-bit index M = 16 steps of K = 16 (scanned by faiss's additive "
               "fast-scan loaded with our tables and codes)" if with_4bit else "") +
           ". Commands:", "", "```bash", *commands,
           f"python experiments/bench_search.py --workdir={args.workdir}{flags} "
           f"--nq={args.nq}", "```", "",
           "R@1 / R@10 and queries per second by nprobe (faiss: the faster of its timings "
           "for 100 results and for 1):", "",
           "| method | " + " | ".join(f"nprobe {r['nprobe']}" for r in first) + " |",
           "|---|" + "---|" * len(first)]
  for name, rows in curves.items():
    if "nprobe" in rows[0]:
      lines.append(f"| {name} | " + " | ".join(_row(r) for r in rows) + " |")
  lines += ["", "(b): nshort=100 results of the first stage; (c): pairwise re-rank of 400 "
            "first-stage results; (d): pairwise 80 -> QINCo2 re-rank of 20 (20 results). "
            "Our lists are chosen by " + (
                "an exact search over the centroids (efSearch plays no part)." if
                exact_coarse else "an HNSW search at efSearch = max(32, 2 nprobe)."), ""]
  for name, rows in other.items():
    lines.append(f"Another memory budget (58 bytes per vector: 8-byte fast-scan codes plus "
                 f"int8 copies of the vectors for re-ranking), not an 8-byte index: {name}: "
                 + "; ".join(f"nprobe {r['nprobe']}: {_row(r)}" for r in rows) + ".")
  tuned = curves.get("ours (tuned)", [])
  if tuned:
    n_grid = int(np.prod([len(v) for v in TUNE_RANGES.values()]))
    logs = [SearchWorkdir(args.workdir).tune_log] + (
        [SearchWorkdir(args.workdir_k16).tune_log] if with_4bit else [])
    n_run = " and ".join(str(len(p.read_text().splitlines())) for p in logs)
    lines += ["", f"**ours (tuned)**: the {len(tuned)} Pareto-optimal settings of the "
              f"sweeps on {args.n_tune:,} validation vectors (one sweep per index: {n_run} "
              f"of {n_grid} settings run, the others pruned), re-timed on the test queries, "
              "then the Pareto front of both indexes' settings together. With "
              "nshort < 10 only nshort results are returned, so R@10 is then R@nshort.",
              "", "| index | nprobe | efSearch | nmid_short | nshort | R@1 | R@10 | qps |",
              "|---|---|---|---|---|---|---|---|"]
    for r in tuned:
      p = r["params"]
      lines.append(f"| {r['index']} | {p['nprobe']} | {p['ef_search']} | {p['nmid_short']} "
                   f"| {p['nshort']} | {r['R@1']:.3f} | {r['R@10']:.3f} | {r['qps']:,.0f} |")
  lines += ["", "**Equal speed, every speed**: at each speed, the best R@1 of the 8-byte "
            "anchors (faiss, and ScaNN when installed) at least that fast, and ours (any "
            "of our settings, either index) at least that fast. Goal: ours >= the "
            "anchors' from 5k to 200k queries/s, and >= 1.2x where they saturate.", "",
            "| queries/s at least | best anchor R@1 (index) | ours R@1 | ratio |",
            "|---|---|---|---|"]
  for r in speeds:
    anchor = (f"{r['anchor']:.3f} ({_anchor(r['anchor_name'])})" if r["anchor"] is not None
              else "none this fast")
    ours = f"{r['ours']:.3f}" if r["ours"] is not None else "none this fast"
    lines.append(f"| {r['qps']:,} | {anchor} | {ours} | " +
                 (f"{r['ratio']:.2f}x" if r["ratio"] else "-") + " |")
  lines += ["", "**At equal speed, per anchor setting**: for each faiss setting, our best "
            "R@1 among our settings that are at least as fast:", "",
            "| faiss index | nprobe | faiss qps | faiss R@1 | ours R@1 (qps) | ratio |",
            "|---|---|---|---|---|---|"]
  summary = []
  for name, ratios in all_ratios.items():
    for r in ratios:
      ours = (f"{r['ours_R@1']:.3f} ({r['ours_qps']:,.0f})" if r["ratio"] else
              "no setting this fast")
      lines.append(f"| {_anchor(name)} | {r['nprobe']} | {r['qps']:,.0f} | {r['faiss_R@1']:.3f} "
                   f"| {ours} | " + (f"{r['ratio']:.2f}x" if r["ratio"] else "-") + " |")
    got = [r["ratio"] or 0.0 for r in ratios]
    summary.append(f"{_anchor(name)}: >= 1.0x at {sum(v >= 1.0 for v in got)} of {len(got)} "
                   f"settings (ratios {min(got):.2f}x to {max(got):.2f}x)")
  lines += ["", "; ".join(summary) + "."]
  for name, c in ceiling.items():
    lines += ["", f"Ceiling of the {name} codes: an exact search over the full QINCo2 "
              f"decoding of every database code (no IVF, no shortlist) gives R@1 "
              f"{c['R@1']:.4f}, R@10 {c['R@10']:.4f}, R@100 {c['R@100']:.4f} (database MSE "
              f"{c['db_mse']:.4f} over all {n_db:,} rows, training rows included)."]
  us, n_sub, D = costs["us"], costs["n_sub"], costs["D"]
  lines += ["", f"What bounds the 8-bit index's fast end: at nprobe 1 its AQ stage takes "
            f"{us['stage_k1']:.1f} us per query for 1 result and {us['stage_k100']:.1f} for "
            f"100 (list search, table, scan); the look-up table alone ({n_sub} x 256 inner "
            f"products of {D} dimensions, every list skipped) takes {us['table']:.1f} us, so "
            f"no setting of it can pass {1e6 / us['table']:,.0f} queries/s."]
  lines += ["", "Shortlist accuracy of the 8-bit index (Table 4 style): R@1 after QINCo2 "
            "re-ranking of an S-element shortlist chosen by each decoder (nprobe 16; "
            "S = 1 is the R@1 of each decoder's own ranking of the same 10 AQ results):", "",
            "| shortlist S | AQ | pairwise (from a 10S AQ list) | full QINCo2 (10S AQ list) "
            "| share of the AQ -> full gap closed by pairwise | gap in queries |",
            "|---|---|---|---|---|---|"]
  for S, r in table4.items():
    aq_, pw, full = r.values()
    closed = f"{(pw - aq_) / (full - aq_):.0%}" if full - aq_ > 1e-9 else "no gap"
    lines.append(f"| {S} | " + " | ".join(f"{v:.4f}" for v in r.values()) +
                 f" | {closed} | {round((full - aq_) * args.nq)} |")
  lines += ["", "![speed-recall](speed_recall.png)", END]
  block = "\n".join(lines)
  write_section(args.doc, block, START, END)
  print(block)

