"""Scale: what building and searching a database larger than memory costs, per vector,
on this machine, and the extrapolation to BigANN-1B and Deep1B. Run by
experiments/bench_scale.py (its docstring: usage).

Parts (`--parts`), each step in a fresh process whose peak RSS (VmHWM), CPU seconds
and wall seconds are measured:

  lists   a synthetic database of random 8-byte codes (no encoding) over `nlist`
          lists, D = 128, written as encode-stage shards, then: the on-disk build
          (`search.build`), opening it memory-mapped, and the AQ stage's search
          (`IVFIndex.search`, `n_cand` candidates with their codes and ids) at each
          nprobe, for each size; at `ram_size` also the in-memory index, for
          queries/s at equal nprobe.
  coarse  the coarse quantiser at `coarse_lists` lists: the two-level K-means on
          `rows_per_list` sampled rows per list of a clustered uint8 128-d set, one
          iteration of faiss's exact K-means on a subset (to extrapolate it), the
          HNSW list search's build and its recall against exact per efSearch.
  encode  vectors per CPU-second of the encoder (M = 8, L = 2, de = 64, dh = 128,
          D = 128, A = 4, B = 4) at each of `encode_lists` lists, with the
          exhaustive IVF step and with candidates from an HNSW list search.
  pipeline  `qinco-search`'s stages, each in its own process, on a BigANN-style
          folder of big-ann-benchmarks files (a clustered uint8 128-d set of
          `pipeline_n` vectors): peak RSS and CPU time per stage, and the sweep.

Results go to `workdir/scale.json` (merged across runs, so parts can run apart) and
docs/benchmarks.md ("Scale").
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

from qinco_jax.bench.harness import DOC, RUNS, log, write_section
from qinco_jax.config import flag

START, END = "<!-- bench_scale:start -->", "<!-- bench_scale:end -->"
REPEATS = 3  # timed searches per setting (the fastest is kept)
FAISS_ROWS = 1 << 16  # coarse part: rows of the one timed faiss K-means iteration
# The list search's settings of results recorded before they were kept with them.
OLD_EF_CONSTRUCTION, OLD_ENCODE_EF_SEARCH = 40, 128
WORKER = [sys.executable, "-c", "from qinco_jax.bench import scale; scale.worker()"]


@dataclasses.dataclass(frozen=True)
class ScaleBench:
  """What `run` measures (flags of experiments/bench_scale.py)."""
  parts: tuple[str, ...] = flag(("lists", "coarse", "encode", "pipeline"),
                                "lists, coarse, encode, pipeline")
  sizes: tuple[int, ...] = flag((1_000_000, 10_000_000, 100_000_000),
                                "lists part: database sizes")
  ram_size: int = flag(10_000_000, "lists part: size also built in memory (0: none)")
  nlist: int = flag(65_536, "lists part: inverted lists")
  shard_rows: int = flag(1 << 22, "lists part: rows per shard file")
  nq: int = flag(1000, "lists part: queries")
  nprobe: tuple[int, ...] = flag((16, 64), "lists part: lists probed per query")
  n_cand: int = flag(1000, "lists part: candidates returned per query (AQ stage)")
  coarse_lists: int = flag(65_536, "coarse part: lists")
  rows_per_list: int = flag(64, "coarse part: training rows per list")
  ef_search: tuple[int, ...] = flag((16, 32, 64, 128, 256, 512, 1024),
                                    "coarse part: efSearch values")
  encode_lists: tuple[int, ...] = flag((1024, 65_536, 1 << 20), "encode part: lists")
  encode_n: int = flag(2000, "encode part: vectors encoded per setting")
  pipeline_n: int = flag(1_000_000, "pipeline part: database vectors")
  pipeline_learn: int = flag(200_000, "pipeline part: learn vectors")
  pipeline_lists: int = flag(4096, "pipeline part: IVF lists")
  reuse: bool = flag(True, "lists part: keep a database built by an earlier run (and its "
                     "build's measurement); search it again")
  workdir: str = flag(os.path.join(RUNS, "bench_scale"), "data and results")
  doc: str = DOC


# ------------------------------------------------------------------ the worker
def _usage() -> dict[str, float]:
  r = resource.getrusage(resource.RUSAGE_SELF)
  hwm = 0
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        hwm = int(line.split()[1]) * 1024
  return {"cpu_s": r.ru_utime + r.ru_stime, "peak_rss": hwm, "wall": time.perf_counter()}


def worker():
  """`WORKER step json_args`: runs one step and prints one JSON line of results."""
  step, args = sys.argv[1], json.loads(sys.argv[2])
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) restarts from the current RSS: not the imports' peak
  base = _usage()
  out = STEPS[step](**args)
  end = _usage()
  out.update(cpu_s=end["cpu_s"] - base["cpu_s"], wall_s=end["wall"] - base["wall"],
             peak_rss=end["peak_rss"], base_rss=base["peak_rss"])
  print("RESULT " + json.dumps(out), flush=True)


def _step(step: str, **args) -> dict:
  load = os.getloadavg()[0]
  r = subprocess.run([*WORKER, step, json.dumps(args)], capture_output=True, text=True,
                     env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS",
                                                                        "cpu")})
  if r.returncode:
    raise SystemExit(f"step {step} failed:\n{r.stderr[-3000:]}")
  line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")][-1]
  res = json.loads(line[len("RESULT "):])
  res["load_before"] = max(load, os.getloadavg()[0])  # the machine's load average
  log(f"{step} {args}: {res}")
  return res


def _synthetic_lists(nlist: int, M: int = 8, D: int = 128, seed: int = 0):
  """Random centroids (nlist, D), AQ tables (M, 256, D) and a sample of codes."""
  rng = np.random.default_rng(seed)
  cents = (30 * rng.standard_normal((nlist, D))).astype(np.float32)
  tables = (3 * rng.standard_normal((M, 256, D))).astype(np.float32)
  sample = np.concatenate([rng.integers(0, nlist, (100_000, 1)),
                           rng.integers(0, 256, (100_000, M))], 1)
  return cents, tables, sample


def _gen_shards(out: str, n: int, nlist: int, shard_rows: int, M: int = 8) -> dict:
  """Encode-stage shard files of n random codes (packed: 2-3 bytes of list id, then M)."""
  from qinco_jax.search import shards
  os.makedirs(out, exist_ok=True)
  nb = max(1, ((nlist - 1).bit_length() + 7) // 8)
  n_sh = max(1, -(-n // shard_rows))
  for i in range(n_sh):
    s, e = shards.shard_range(n, i, n_sh)
    rng = np.random.default_rng(1000 + i)
    lst = rng.integers(0, nlist, e - s)
    packed = np.concatenate([((lst[:, None] >> (8 * np.arange(nb))) & 255).astype(np.uint8),
                             rng.integers(0, 256, (e - s, M), dtype=np.uint8)], 1)
    path = shards.shard_path(out, "codes_db", i, n_sh)
    np.save(path, packed)
    with open(path.with_suffix(".json"), "w") as f:
      json.dump({"n_db": n, "rows": [int(s), int(e)], "fields": [nb] + [1] * M,
                 "codec": "synthetic", "fingerprint": "synthetic"}, f)
  return {"shards": n_sh}


def _shard_readers(out: str):
  from qinco_jax.search import shards
  found = shards.find_shards(out)

  def reader(p, meta):
    def chunks():
      for start, codes in shards.iter_shard(p, meta):
        s = meta["rows"][0] + start
        yield codes, np.arange(s, s + len(codes))
    return chunks
  return [(p.name, reader(p, meta)) for p, meta in found]


def _build(out: str, nlist: int) -> dict:
  from qinco_jax.search import build, lists
  cents, tables, sample = _synthetic_lists(nlist)
  ivf = lists.empty_index(cents, tables, sample, coarse="flat")
  got = build.build_lists(os.path.join(out, "lists"), ivf, _shard_readers(out),
                          os.path.join(out, "scratch"))
  size = os.path.getsize(os.path.join(out, "lists", lists.LISTS_FILE))
  return {"ntotal": got.ntotal, "file_bytes": size}


def _search(out: str, nlist: int, nq: int, nprobe: list, n_cand: int, ram: bool) -> dict:
  """Opens (memory-mapped) or builds in memory (ram), then times the AQ stage."""
  from qinco_jax.search import lists
  rng = np.random.default_rng(7)
  cents, tables, sample = _synthetic_lists(nlist)
  t0 = time.perf_counter()
  if ram:
    ivf = lists.empty_index(cents, tables, sample, coarse="flat")
    for _, chunks in _shard_readers(out):
      for codes, ids in chunks():
        ivf.add(codes, ids)
  else:
    ivf = lists.IVFIndex.open(os.path.join(out, "lists"))
  load_s = time.perf_counter() - t0
  after_load = _usage()["peak_rss"]
  q = (cents[rng.integers(0, nlist, nq)] + 10 * rng.standard_normal((nq, 128))).astype(
      np.float32)
  qps, cpu_ms = {}, {}
  for p in nprobe:
    ivf.search(q, n_cand, p, 64)  # warm: the probed pages in the page cache
    best = (np.inf, np.inf)
    for _ in range(REPEATS):  # the fastest of REPEATS (the machine is shared)
      u0 = _usage()
      D, L, C, I = ivf.search(q, n_cand, p, 64)
      u1 = _usage()
      best = min(best, (u1["wall"] - u0["wall"], u1["cpu_s"] - u0["cpu_s"]))
    assert (I[:, 0] >= 0).all()
    qps[str(p)] = nq / best[0]
    cpu_ms[str(p)] = 1e3 * best[1] / nq
  return {"load_s": load_s, "rss_after_load": after_load, "qps": qps,
          "cpu_ms_per_query": cpu_ms, "ntotal": ivf.ntotal, **_rss_kinds()}


def _rss_kinds() -> dict[str, int]:
  """Resident memory now, split: anonymous (the process's own) and file pages mapped
  (here the list file's pages the queries touched: page cache, shared, reclaimable)."""
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      for k in ("RssAnon", "RssFile"):
        if line.startswith(k + ":"):
          out[k.lower()] = int(line.split()[1]) * 1024
  return out


def _clustered(n: int, D: int = 128, seed: int = 0) -> np.ndarray:
  """uint8 rows around 1,000 random centres (SIFT-like range)."""
  rng = np.random.default_rng(seed)
  centres = rng.uniform(20, 235, (1000, D))
  out = np.empty((n, D), np.uint8)
  for s in range(0, n, 1 << 20):
    e = min(n, s + (1 << 20))
    x = centres[rng.integers(0, 1000, e - s)] + 20 * rng.standard_normal((e - s, D))
    out[s:e] = np.clip(x, 0, 255)
  return out


def _coarse(K: int, rows_per_list: int, ef_search: list) -> dict:
  import faiss

  from qinco_jax.search import coarse
  x = _clustered(K * rows_per_list)
  u0 = _usage()
  cents = coarse.two_level_kmeans(x, K, verbose=False)
  u1 = _usage()
  graph = coarse.build_coarse(cents, "hnsw")
  u2 = _usage()
  q = _clustered(1000, seed=1).astype(np.float32)
  recall = {str(k): v for k, v in coarse.list_search_recall(graph, cents, q, 64,
                                                            ef_search).items()}
  d, _ = faiss.knn(x[:200_000].astype(np.float32), cents, 1)
  # One exact (faiss) K-means iteration on a subset, to extrapolate its cost.
  sub = x[:FAISS_ROWS].astype(np.float32)
  km = faiss.Kmeans(x.shape[1], K, niter=1, max_points_per_centroid=1 << 30, seed=0)
  u3 = _usage()
  km.train(sub)
  u4 = _usage()
  dk, _ = faiss.knn(x[:200_000].astype(np.float32), km.centroids, 1)
  return {"K": K, "rows": len(x), "two_level": {"cpu_s": u1["cpu_s"] - u0["cpu_s"],
                                        "wall_s": u1["wall"] - u0["wall"],
                                        "mse": float(d.mean())},
          "hnsw": {"cpu_s": u2["cpu_s"] - u1["cpu_s"], "wall_s": u2["wall"] - u1["wall"],
                   "ef_construction": coarse.EF_CONSTRUCTION},
          "recall_at_64": recall,
          "faiss_1iter": {"rows": len(sub), "cpu_s": u4["cpu_s"] - u3["cpu_s"],
                          "wall_s": u4["wall"] - u3["wall"], "mse_1iter": float(dk.mean())}}


def encode_setup(ivf_K: int, n: int) -> tuple[Any, np.ndarray, np.ndarray]:
  """The encode part's codec (random weights, ivf_K lists), its raw centroids
  (ivf_K, 128) float32 (sampled rows plus noise) and n raw vectors (n, 128) float32."""
  import dataclasses as dc

  import jax.numpy as jnp

  import qinco_jax as qj
  rng = np.random.default_rng(0)
  x = _clustered(max(n, 20_000), seed=2).astype(np.float32)
  cfg = qj.QincoConfig(K=256, M=8, L=2, de=64, dh=128, A=4, B=4, ivf_K=256)
  codec = qj.Codec.create(cfg, x, verbose=False, ivf_centroids=x[:256])
  cents = x[rng.integers(0, len(x), ivf_K)] + rng.standard_normal((ivf_K, 128)).astype(
      np.float32)
  m = codec.model()
  st: Any = codec.state
  st["ivf_centroids"] = st["ivf_centroids"].replace(jnp.asarray(
      (cents - np.asarray(m.data_mean[...])) / float(m.data_std[...])))
  return qj.Codec(dc.replace(cfg, ivf_K=ivf_K), 128, st), cents, x[:n]


def _encode(ivf_K: int, n: int) -> dict:
  from qinco_jax.search import coarse
  codec, cents, q = encode_setup(ivf_K, n)
  out = {}
  codec.encode(q[:256], verbose=False)  # compile
  u0 = _usage()
  full = codec.encode(q, verbose=False)
  u1 = _usage()
  out["exhaustive"] = {"vec_per_cpu_s": n / (u1["cpu_s"] - u0["cpu_s"]),
                       "vec_per_s": n / (u1["wall"] - u0["wall"])}
  graph = coarse.build_coarse(cents, "hnsw")
  u2 = _usage()
  out["hnsw_build"] = {"cpu_s": u2["cpu_s"] - u1["cpu_s"], "wall_s": u2["wall"] - u1["wall"],
                       "ef_construction": coarse.EF_CONSTRUCTION}
  fn = coarse.candidates(graph, 4, coarse.ENCODE_EF_SEARCH)
  codec.encode(q[:256], verbose=False, ivf_candidates=fn)  # compile
  u3 = _usage()
  cand = codec.encode(q, verbose=False, ivf_candidates=fn)
  u4 = _usage()
  out["candidates"] = {"vec_per_cpu_s": n / (u4["cpu_s"] - u3["cpu_s"]),
                       "vec_per_s": n / (u4["wall"] - u3["wall"]),
                       "same_codes": float((cand == full).all(1).mean()),
                       "ef_search": coarse.ENCODE_EF_SEARCH}
  return out


def _pipeline_data(root: str, n: int, n_learn: int, nq: int) -> dict:
  """A BigANN-style folder (big-ann-benchmarks files): clustered uint8 128-d learn,
  base and query sets and the exact top-100 of each query."""
  from qinco_jax import data
  os.makedirs(root, exist_ok=True)
  x = _clustered(n_learn + n + nq, seed=3)
  data.write_vecs(os.path.join(root, "learn.100M.u8bin"), x[:n_learn])
  data.write_vecs(os.path.join(root, "base.1B.u8bin"), x[n_learn:n_learn + n])
  q = x[n_learn + n:]
  data.write_vecs(os.path.join(root, "query.public.10K.u8bin"), q)
  gt = data.compute_gt(x[n_learn:n_learn + n], q, 100)
  data.write_vecs(os.path.join(root, "GT.public.1B.ibin"), gt.astype(np.int32))
  return {}


def _pipeline_stage(argv: list) -> dict:
  """One stage of `qinco-search`, in this process (its peak RSS is the stage's)."""
  from qinco_jax import cli
  try:
    cli.search(["qinco-search", *argv])
  except SystemExit as e:
    if e.code:
      raise
  return {}


STEPS = {"gen": _gen_shards, "build": _build, "search": _search, "coarse": _coarse,
         "encode": _encode, "pipeline_data": _pipeline_data,
         "pipeline_stage": _pipeline_stage}
PIPELINE_STAGES = ("ivf", "train", "encode", "build", "search")


# ------------------------------------------------------------------ the benchmark
def run(opts: ScaleBench, command: str) -> None:
  os.makedirs(opts.workdir, exist_ok=True)
  res_path = os.path.join(opts.workdir, "scale.json")
  res: dict[str, Any] = {}
  if os.path.exists(res_path):
    with open(res_path) as f:
      res = json.load(f)
  if "lists" in opts.parts:
    res["nlist"] = opts.nlist
    rows = res.setdefault("lists", {})
    for n in opts.sizes:
      out = os.path.join(opts.workdir, f"db{n}")
      r = rows.get(str(n), {})
      built = os.path.exists(os.path.join(out, "lists", "lists.json"))
      if not (opts.reuse and built and "build" in r):
        _step("gen", out=out, n=n, nlist=opts.nlist, shard_rows=opts.shard_rows)
        r["build"] = _step("build", out=out, nlist=opts.nlist)
      r["mmap"] = _step("search", out=out, nlist=opts.nlist, nq=opts.nq,
                        nprobe=list(opts.nprobe), n_cand=opts.n_cand, ram=False)
      if n == opts.ram_size:
        r["ram"] = _step("search", out=out, nlist=opts.nlist, nq=opts.nq,
                         nprobe=list(opts.nprobe), n_cand=opts.n_cand, ram=True)
      rows[str(n)] = r
      _save(res_path, res)
  if "coarse" in opts.parts:
    res["coarse"] = _step("coarse", K=opts.coarse_lists, rows_per_list=opts.rows_per_list,
                          ef_search=list(opts.ef_search))
    _save(res_path, res)
  if "encode" in opts.parts:
    enc = res.setdefault("encode", {})
    for K in opts.encode_lists:
      enc[str(K)] = {"n": opts.encode_n, **_step("encode", ivf_K=K, n=opts.encode_n)}
      _save(res_path, res)
  if "pipeline" in opts.parts:
    root = os.path.join(opts.workdir, "pipeline_data")
    work = os.path.join(opts.workdir, "pipeline")
    if not os.path.exists(os.path.join(root, "GT.public.1B.ibin")):
      _step("pipeline_data", root=root, n=opts.pipeline_n, n_learn=opts.pipeline_learn,
            nq=opts.nq)
    flags = [f"--workdir={work}", "--data=bigann", f"--root={root}",
             f"--ivf_K={opts.pipeline_lists}", "--M=8", "--L=2", "--de=64", "--dh=128",
             "--A=4", "--B=4", "--epochs=2", "--stop_patience=10", "--max_experiments=4",
             f"--shard_rows={opts.pipeline_n // 4}"]
    pipe = res.setdefault("pipeline", {"n": opts.pipeline_n, "lists": opts.pipeline_lists,
                                       "learn": opts.pipeline_learn})
    for stage in PIPELINE_STAGES:
      pipe[stage] = _step("pipeline_stage", argv=[f"--stage={stage}", *flags])
      _save(res_path, res)
    with open(os.path.join(work, "sweep.jsonl")) as f:
      pipe["sweep"] = [json.loads(line) for line in f]
  cmds = res.setdefault("commands", {})
  for k in [k for k in cmds if not k.startswith("python")]:  # {parts: command} before
    cmds[cmds.pop(k)] = k
  cmds[command] = ",".join(opts.parts)
  _save(res_path, res)
  block = render(res, opts)
  print(block)
  write_section(opts.doc, block, START, END)


def _save(path: str, res: dict):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(res, f, indent=1)
  os.replace(tmp, path)


GB = 1e9
HOSTS = 4  # the extrapolation's index parts (hosts)
GOAL_GB = 40  # the goal's peak RSS per 64 GB host


def render(res: dict, opts: ScaleBench) -> str:
  """The doc section from the saved results: what was measured, then the
  extrapolation to BigANN-1B and Deep1B (every figure marked)."""
  L = [START, "## Scale (experiments/bench_scale.py)", "",
       "Commands (each part's results are kept in `runs/bench_scale/scale.json`, so "
       "parts can run apart; a later run of a part replaces the measurements it repeats: "
       "a lists run over a database built earlier keeps its build's figures and measures "
       "the search again):", ""]
  L += [f"    {c}" for c in res.get("commands", {})]
  loads = _loads(res)
  L += ["", f"This machine: {os.cpu_count()} CPU cores shared with other jobs (load "
        f"average {min(loads, default=0):.0f}-{max(loads, default=0):.0f} when the steps "
        "that record it started), so wall times are pessimistic and vary from run "
        "to run; CPU seconds (user + system, every thread) are the steadier measure. "
        "Peak RSS is the process's VmHWM: it includes the ~0.2 GB of the Python, JAX "
        "and faiss imports (`base`) and, for memory-mapped files, the pages of the file "
        "the process touched (the page cache's, shared, dropped under pressure).", ""]
  lists = res.get("lists", {})
  if lists:
    L += ["### On-disk lists: build, open, search (measured)", "",
          f"Random 8-byte codes (M = 8, K = 256) over {opts.nlist:,} lists, D = 128, "
          f"written as encode-stage shards of {opts.shard_rows:,} rows; the build is "
          "`search.build` (one sorted run per shard, then the merge); search is the "
          f"AQ stage returning {opts.n_cand:,} candidates with their codes and ids for "
          f"{opts.nq:,} queries (the stage whose cost grows with N; the pairwise "
          "shortlist and the re-rank work on the candidates only), the fastest of "
          f"{REPEATS} after a warm-up (list pages in the page cache).", "",
          "| N | list file, B/vec | build: peak RSS (above base) | build: CPU us/vec | "
          "open: s | RSS after open | search: peak RSS (after: own / file pages) | "
          "queries/s, nprobe " + " / ".join(map(str, opts.nprobe)) + " | CPU ms/query |",
          "|---|---|---|---|---|---|---|---|---|"]
    for n, r in sorted(lists.items(), key=lambda kv: int(kv[0])):
      n_i, b, m = int(n), r["build"], r["mmap"]
      L.append(
          f"| {n_i:,} | {b['file_bytes'] / n_i:.1f} | {b['peak_rss'] / GB:.2f} GB "
          f"({(b['peak_rss'] - b['base_rss']) / GB:.2f}) | {1e6 * b['cpu_s'] / n_i:.2f} | "
          f"{m['load_s']:.2f} | {m['rss_after_load'] / GB:.2f} GB | "
          f"{m['peak_rss'] / GB:.2f} GB ({m.get('rssanon', 0) / GB:.2f} / "
          f"{m.get('rssfile', 0) / GB:.2f}) | "
          + " / ".join(f"{v:.0f}" for v in m["qps"].values()) + " | "
          + " / ".join(f"{v:.1f}" for v in m.get("cpu_ms_per_query", {}).values()) + " |")
    for n, r in lists.items():
      if "ram" in r:
        ram, m = r["ram"], r["mmap"]
        L += ["", f"In memory at N = {int(n):,} (the same shards added to an in-memory "
              f"`IVFIndex`): RSS {ram['rss_after_load'] / GB:.2f} GB once the rows are in "
              f"({(ram['rss_after_load'] - ram['base_rss']) / int(n):.0f} B/vec above base) "
              f"against {m['rss_after_load'] / GB:.2f} GB once the built file is opened "
              f"memory-mapped; adding the rows took {ram['load_s']:.0f} s against "
              f"{m['load_s']:.2f} s to open the built file; queries/s at nprobe "
              + " / ".join(map(str, opts.nprobe)) + ": "
              + " / ".join(f"{v:.0f}" for v in ram["qps"].values()) + " in memory, "
              + " / ".join(f"{v:.0f}" for v in m["qps"].values()) + " memory-mapped"
              + (" (CPU ms/query " + " / ".join(f"{v:.2f}" for v in ram[
                  "cpu_ms_per_query"].values()) + " and " + " / ".join(
                      f"{v:.2f}" for v in m["cpu_ms_per_query"].values()) + ")"
                 if "cpu_ms_per_query" in ram and "cpu_ms_per_query" in m else "") + "."]
  c = res.get("coarse")
  if c:
    Kc = c.get("K", 65_536)
    L += ["", f"### Coarse quantiser at {Kc:,} lists (measured)", "",
          f"Two-level K-means (`search.coarse.two_level_kmeans`, "
          f"{int(round(np.sqrt(Kc))):,} coarse clusters, "
          f"20 iterations per level) on {c['rows']:,} rows ({c['rows'] // Kc}"
          " per list) of a clustered uint8 128-d set: "
          f"{c['two_level']['cpu_s']:.0f} CPU s ({c['two_level']['wall_s']:.0f} s wall), "
          f"MSE {c['two_level']['mse']:.1f} on 200k of its rows. One iteration of faiss's "
          f"exact K-means on {c['faiss_1iter']['rows']:,} rows: "
          f"{c['faiss_1iter']['cpu_s']:.0f} CPU s ({c['faiss_1iter']['wall_s']:.0f} s wall). "
          "HNSW32 list search over the centroids (efConstruction "
          f"{c['hnsw'].get('ef_construction', OLD_EF_CONSTRUCTION)}): "
          f"{c['hnsw']['cpu_s']:.0f} CPU s to build. Its recall of the 64 nearest lists "
          "(against exact search, 1,000 queries from the same distribution) per "
          "efSearch: " + ", ".join(f"{k}: {v:.3f}" for k, v in c["recall_at_64"].items())
          + "."]
  enc = res.get("encode")
  if enc:
    r0 = next(iter(enc.values()))
    L += ["", "### Encoding with many lists (measured)", "",
          f"{r0.get('n', opts.encode_n):,} vectors, D = 128, M = 8, "
          "L = 2, de = 64, dh = 128, A = 4, "
          "B = 4 (random weights: the cost does not depend on them); the IVF step "
          "exhaustive (every centroid scored) or from the B = 4 lists an HNSW list "
          "search returns (efSearch "
          f"{r0['candidates'].get('ef_search', OLD_ENCODE_EF_SEARCH)}, efConstruction "
          f"{r0['hnsw_build'].get('ef_construction', OLD_EF_CONSTRUCTION)}). Same codes: "
          "the fraction of vectors coded "
          "identically by both.", "",
          "| lists | exhaustive: vectors/CPU-s | candidates: vectors/CPU-s | speed-up | "
          "same codes | HNSW build: CPU s |", "|---|---|---|---|---|---|"]
    for K, r in sorted(enc.items(), key=lambda kv: int(kv[0])):
      ex, ca = r["exhaustive"]["vec_per_cpu_s"], r["candidates"]["vec_per_cpu_s"]
      L.append(f"| {int(K):,} | {ex:,.0f} | {ca:,.0f} | {ca / ex:.1f}x | "
               f"{r['candidates']['same_codes']:.3f} | {r['hnsw_build']['cpu_s']:.0f} |")
  pipe = res.get("pipeline")
  if pipe and "search" in pipe:
    n = pipe["n"]
    L += ["", "### A small real pipeline (measured)", "",
          f"`qinco-search --data=bigann` on a folder of big-ann-benchmarks files "
          f"(clustered uint8 128-d, {n:,} base vectors, "
          f"{pipe.get('learn', opts.pipeline_learn):,} learn), "
          f"{pipe['lists']:,} lists, M = 8, L = 2, de = 64, dh = 128, A = B = 4, 2 epochs, "
          "4 shard files; each stage in its own process.", "",
          "| stage | CPU s | wall s | peak RSS | above base, B per database vector (fixed "
          "costs dominate at this size) |", "|---|---|---|---|---|"]
    for stage in PIPELINE_STAGES:
      r = pipe[stage]
      L.append(f"| {stage} | {r['cpu_s']:.0f} | {r['wall_s']:.0f} | "
               f"{r['peak_rss'] / GB:.2f} GB | {(r['peak_rss'] - r['base_rss']) / n:.0f} |")
    best = max(pipe.get("sweep", []), key=lambda r: r["R@1"], default=None)
    if best:
      L += ["", f"Best R@1 of the search stage's sweep: {best['R@1']:.3f} (R@10 "
            f"{best['R@10']:.3f}) at {json.dumps(best['params'])}, "
            f"{best['ms_per_query']['total']:.2f} ms/query."]
  L += ["", *extrapolate(res), END]
  return "\n".join(L)


def _loads(res: dict) -> list[float]:
  """The load averages recorded by the steps (`_step`), anywhere in the results."""
  out: list[float] = []

  def walk(v):
    if isinstance(v, dict):
      if "load_before" in v:
        out.append(v["load_before"])
      for w in v.values():
        walk(w)
  walk(res)
  return out


def extrapolate(res: dict) -> list[str]:
  """BigANN-1B and Deep1B at 2^20 lists, M = 8, on HOSTS hosts, from the measurements,
  and whether they meet the goal (GOAL_GB of RSS per host; cost per vector flat)."""
  lists, c, enc = res.get("lists", {}), res.get("coarse"), res.get("encode", {})
  if not (lists and c and str(1 << 20) in enc):
    return []
  sizes = sorted(lists, key=int)
  big, n_big = lists[sizes[-1]], int(sizes[-1])
  small, n_small = lists[sizes[0]], int(sizes[0])
  N, hosts, K = 10 ** 9, HOSTS, 1 << 20
  per_host = N / hosts
  out = [f"### Extrapolated to 10^9 vectors, 2^20 lists, M = 8, {hosts} hosts", "",
         "Each figure says where it comes from: (m) measured above, (x) extrapolated "
         "from the measurement named. CPU hours are this machine's cores; \"total / per "
         f"host\" splits a stage that runs on every host ({hosts} index parts, "
         "`search.serve`); the ivf stage runs on one.", "",
         "| | BigANN-1B (D = 128) | Deep1B (D = 96) |", "|---|---|---|"]
  for_d = lambda f, fmt=".1f": f"{f(128):{fmt}} | {f(96):{fmt}}"
  cent = lambda D: 3 * K * D * 4 / GB  # numpy + the flat list term + the HNSW's copy
  out.append(f"| centroids in RAM per host, GB (x: 3 copies of 2^20 x D float32) | "
             f"{for_d(cent)} |")
  per_vec = big["build"]["file_bytes"] / n_big
  file_gb = per_host * per_vec / GB
  out.append(f"| list file per host, GB (m: {per_vec:.1f} B/vec at {n_big:,}) | "
             f"{file_gb:.1f} | {file_gb:.1f} |")
  slope = max(0.0, (big["build"]["peak_rss"] - small["build"]["peak_rss"]) / (n_big - n_small))
  build_peak = (big["build"]["peak_rss"] + slope * max(0.0, per_host - n_big)) / GB
  out.append(f"| build: peak RSS per host, GB (x: {big['build']['peak_rss'] / GB:.2f} at "
             f"{n_big:,} + {slope:.1f} B/vec measured from {n_small:,} to {n_big:,}, to "
             f"{per_host:,.0f} rows; + the centroids) | "
             + for_d(lambda D: build_peak + cent(D)) + " |")
  m = big["mmap"]
  anon = m.get("rssanon", m["peak_rss"]) / GB
  search_gb = lambda D: anon + cent(D) + file_gb
  out.append(f"| search: RSS per host, GB, at worst (x: {anon:.2f} GB of the process's own "
             f"memory at {n_big:,}" + ("" if "rssanon" in m else " (its peak RSS)")
             + " + the centroids + every page of the list file; the pages are the page "
             "cache's, dropped under pressure) | " + for_d(search_gb) + " |")
  # Two-level K-means: rows x (sqrt(K) + K / sqrt(K)) distances per iteration.
  k0 = c.get("K", 65_536)
  rows_x = K * 64 / c["rows"]
  scale = rows_x * np.sqrt(K) / np.sqrt(k0)
  hnsw_h = enc[str(K)]["hnsw_build"]["cpu_s"] / 3600
  ivf_h = c["two_level"]["cpu_s"] * scale / 3600
  out.append(f"| ivf: two-level K-means at 64 rows/list, CPU h (x: "
             f"{c['two_level']['cpu_s']:.0f} CPU s at {k0:,} lists on {c['rows']:,} rows "
             f"x {rows_x:.0f} the rows x {np.sqrt(K / k0):.0f} the distances per row; "
             "D scaling for Deep1B) | " + for_d(lambda D: ivf_h * D / 128, ",.1f") + " |")
  out.append(f"| ivf: HNSW32 list search over 2^20 centroids, CPU h (m: encode part, D = "
             f"128) | {hnsw_h:.2f} | {hnsw_h * 96 / 128:.2f} (x) |")
  exact_h = c["faiss_1iter"]["cpu_s"] * (K * 256 / c["faiss_1iter"]["rows"]) * (K / k0) \
      * 100 / 3600
  out.append("| ivf: faiss exact K-means instead, CPU h (x: one iteration above x 100 "
             f"iterations, 256 rows/list, {K // k0}x the lists) | "
             + for_d(lambda D: exact_h * D / 128, ",.0f") + " |")
  e = enc[str(K)]
  enc_h = N / e["candidates"]["vec_per_cpu_s"] / 3600
  enc_ex = N / e["exhaustive"]["vec_per_cpu_s"] / 3600
  out.append(f"| encode, CPU h total / per host (m: {e['candidates']['vec_per_cpu_s']:,.0f} "
             f"vectors/CPU-s at 2^20 lists with candidates, {e['candidates']['same_codes']:.3f}"
             f" of the codes as exhaustive; exhaustive: {enc_ex:,.0f} h; Deep1B: the same "
             f"rate, an upper bound) | {enc_h:,.0f} / {enc_h / hosts:,.0f} | "
             f"{enc_h:,.0f} / {enc_h / hosts:,.0f} |")
  b_us = 1e6 * big["build"]["cpu_s"] / n_big
  b_h = N * b_us / 1e6 / 3600
  out.append(f"| build, CPU h total / per host (m: {b_us:.2f} CPU us/vec at {n_big:,}; "
             f"{1e6 * small['build']['cpu_s'] / n_small:.2f} at {n_small:,}) | "
             f"{b_h:.1f} / {b_h / hosts:.1f} | {b_h:.1f} / {b_h / hosts:.1f} |")
  nlist = res.get("nlist", 65_536)
  cpu_q = list(m.get("cpu_ms_per_query", {}).values())
  cpu_s = list(small["mmap"].get("cpu_ms_per_query", {}).values())
  if cpu_q and cpu_s:
    # a + b * rows per list, through the smallest and the largest database
    r0, r1 = n_small / nlist, n_big / nlist
    b = (cpu_q[-1] - cpu_s[-1]) / (r1 - r0)
    q_ms = cpu_s[-1] + b * (per_host / K - r0)
    out.append(f"| search, AQ stage, CPU ms/query per host at nprobe {list(m['qps'])[-1]} "
               f"(x: {cpu_s[-1]:.2f} at {r0:,.0f} and {cpu_q[-1]:.2f} at {r1:,.0f} rows "
               f"per list (m), a line through them at {per_host / K:,.0f}; the list search "
               f"here is exact over {nlist:,} lists, at 2^20 an HNSW graph: its cost is not "
               f"in this figure) | {q_ms:.1f} | {q_ms:.1f} |")
  worst = max(build_peak + cent(128), search_gb(128))
  ef_top = max(c["recall_at_64"], key=int)
  flat = b_us <= 1.2 * 1e6 * small["build"]["cpu_s"] / n_small
  out += ["", "Not in the table: the train stage (its cost is set by a time budget, not by "
          "N) and the ground truth.", "",
          f"Goal: 10^9 vectors at 8 bytes on 64 GB hosts, at most {GOAL_GB} GB per host with "
          f"{hosts} parts, every stage's cost per vector flat from 1M to 100M. RAM: "
          f"{'met' if worst <= GOAL_GB else 'not met'} by extrapolation ({worst:.1f} GB at "
          "worst per host for BigANN-1B, the list file included whole; measured up to "
          f"{n_big:,} vectors on one host, not at 10^9). Cost per vector: the build's CPU "
          f"time per vector {'is' if flat else 'is not'} flat ("
          + ", ".join(f"{1e6 * lists[n]['build']['cpu_s'] / int(n):.2f} us at {int(n):,}"
                      for n in sizes)
          + "), opening the lists takes "
          + ", ".join(f"{lists[n]['mmap']['load_s']:.1f} s" for n in sizes)
          + "; a query's AQ scan grows with the rows per probed list (N / lists at fixed "
          "lists: per row scanned it is flat), so the lists must grow with N (2^20 at "
          "10^9); the encoder's cost per vector does not depend on N (measured per list "
          "count above), nor does the coarse quantiser's (it samples 64 rows per list). "
          "The coarse quantiser at 2^20 lists is the stage that wants an accelerator or "
          f"several hosts. The HNSW list search at {k0:,} lists finds "
          f"{c['recall_at_64'][ef_top]:.2f} of the 64 nearest lists at efSearch {ef_top} "
          f"(efConstruction {c.get('hnsw', {}).get('ef_construction', OLD_EF_CONSTRUCTION)}) "
          "on this "
          "clustered set; the efConstruction and efSearch it needs are measured in \"List "
          "search settings\" below."]
  return out
