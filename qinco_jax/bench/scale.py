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
WORKER = [sys.executable, "-c", "from qinco_jax.bench import scale; scale.worker()"]


@dataclasses.dataclass(frozen=True)
class ScaleBench:
  """What `run` measures (flags of experiments/bench_scale.py)."""
  parts: tuple[str, ...] = flag(("lists", "coarse", "encode"), "lists, coarse, encode")
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
  ef_search: tuple[int, ...] = flag((16, 32, 64, 128, 256), "coarse part: efSearch values")
  encode_lists: tuple[int, ...] = flag((1024, 65_536, 1 << 20), "encode part: lists")
  encode_n: int = flag(2000, "encode part: vectors encoded per setting")
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
  base = _usage()
  out = STEPS[step](**args)
  end = _usage()
  out.update(cpu_s=end["cpu_s"] - base["cpu_s"], wall_s=end["wall"] - base["wall"],
             peak_rss=end["peak_rss"], base_rss=base["peak_rss"])
  print("RESULT " + json.dumps(out), flush=True)


def _step(step: str, **args) -> dict:
  r = subprocess.run([*WORKER, step, json.dumps(args)], capture_output=True, text=True,
                     env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS",
                                                                        "cpu")})
  if r.returncode:
    raise SystemExit(f"step {step} failed:\n{r.stderr[-3000:]}")
  line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")][-1]
  res = json.loads(line[len("RESULT "):])
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
  qps = {}
  for p in nprobe:
    ivf.search(q, n_cand, p, 64)  # warm: the probed pages in the page cache
    t0 = time.perf_counter()
    D, L, C, I = ivf.search(q, n_cand, p, 64)
    qps[str(p)] = nq / (time.perf_counter() - t0)
    assert (I[:, 0] >= 0).all()
  return {"load_s": load_s, "rss_after_load": after_load, "qps": qps, "ntotal": ivf.ntotal}


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
  sub = x[:1 << 18].astype(np.float32)
  km = faiss.Kmeans(x.shape[1], K, niter=1, max_points_per_centroid=1 << 30, seed=0)
  u3 = _usage()
  km.train(sub)
  u4 = _usage()
  dk, _ = faiss.knn(x[:200_000].astype(np.float32), km.centroids, 1)
  return {"rows": len(x), "two_level": {"cpu_s": u1["cpu_s"] - u0["cpu_s"],
                                        "wall_s": u1["wall"] - u0["wall"],
                                        "mse": float(d.mean())},
          "hnsw": {"cpu_s": u2["cpu_s"] - u1["cpu_s"], "wall_s": u2["wall"] - u1["wall"]},
          "recall_at_64": recall,
          "faiss_1iter": {"rows": len(sub), "cpu_s": u4["cpu_s"] - u3["cpu_s"],
                          "wall_s": u4["wall"] - u3["wall"], "mse_1iter": float(dk.mean())}}


def _encode(ivf_K: int, n: int) -> dict:
  import dataclasses as dc

  import jax.numpy as jnp

  import qinco_jax as qj
  from qinco_jax.search import coarse
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
  codec = qj.Codec(dc.replace(cfg, ivf_K=ivf_K), 128, st)
  q = x[:n]
  out = {}
  codec.encode(q[:256], verbose=False)  # compile
  u0 = _usage()
  full = codec.encode(q, verbose=False)
  u1 = _usage()
  out["exhaustive"] = {"vec_per_cpu_s": n / (u1["cpu_s"] - u0["cpu_s"]),
                       "vec_per_s": n / (u1["wall"] - u0["wall"])}
  graph = coarse.build_coarse(cents, "hnsw")
  u2 = _usage()
  out["hnsw_build"] = {"cpu_s": u2["cpu_s"] - u1["cpu_s"], "wall_s": u2["wall"] - u1["wall"]}
  fn = coarse.candidates(graph, 4, coarse.ENCODE_EF_SEARCH)
  codec.encode(q[:256], verbose=False, ivf_candidates=fn)  # compile
  u3 = _usage()
  cand = codec.encode(q, verbose=False, ivf_candidates=fn)
  u4 = _usage()
  out["candidates"] = {"vec_per_cpu_s": n / (u4["cpu_s"] - u3["cpu_s"]),
                       "vec_per_s": n / (u4["wall"] - u3["wall"]),
                       "same_codes": float((cand == full).all(1).mean())}
  return out


STEPS = {"gen": _gen_shards, "build": _build, "search": _search, "coarse": _coarse,
         "encode": _encode}


# ------------------------------------------------------------------ the benchmark
def run(opts: ScaleBench, command: str) -> None:
  os.makedirs(opts.workdir, exist_ok=True)
  res_path = os.path.join(opts.workdir, "scale.json")
  res: dict[str, Any] = {}
  if os.path.exists(res_path):
    with open(res_path) as f:
      res = json.load(f)
  if "lists" in opts.parts:
    rows = res.setdefault("lists", {})
    for n in opts.sizes:
      out = os.path.join(opts.workdir, f"db{n}")
      _step("gen", out=out, n=n, nlist=opts.nlist, shard_rows=opts.shard_rows)
      r = {"build": _step("build", out=out, nlist=opts.nlist),
           "mmap": _step("search", out=out, nlist=opts.nlist, nq=opts.nq,
                         nprobe=list(opts.nprobe), n_cand=opts.n_cand, ram=False)}
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
      enc[str(K)] = _step("encode", ivf_K=K, n=opts.encode_n)
      _save(res_path, res)
  res.setdefault("commands", {})[",".join(opts.parts)] = command
  _save(res_path, res)
  block = render(res, opts)
  print(block)
  write_section(opts.doc, block, START, END)


def _save(path: str, res: dict):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(res, f, indent=1)
  os.replace(tmp, path)


def render(res: dict, opts: ScaleBench) -> str:
  """The doc section from the saved results (measured rows, then extrapolations)."""
  return json.dumps(res, indent=1)  # filled in below
