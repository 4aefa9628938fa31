"""List search settings at many lists: what efConstruction, HNSW M and efSearch buy
and cost, to choose the defaults of `search.coarse`. Run by
experiments/bench_list_search.py (its docstring: usage).

  recall  two-level K-means centroids (`coarse.two_level_kmeans`) of `rows_per_list`
          rows per list of the Scale benchmark's clustered uint8 128-d set; for each
          (M, efConstruction) the HNSW build's CPU seconds and the recall of the 64
          nearest lists against exact search (1,000 queries from the same
          distribution) at each efSearch.
  encode  the Scale benchmark's encoder (`scale.encode_setup`: A = B = 4, sampled-row
          centroids) at `encode_lists` lists: for each (M, efConstruction) and each
          encoder efSearch, vectors per CPU-second with the IVF candidates from the
          HNSW list search and the fraction of vectors whose codes equal the
          exhaustive IVF step's.

Everything runs in this process; CPU seconds are the process's (all threads). The
results are printed and written to `workdir/list_search.json`; the Markdown block goes
to docs/benchmarks.md between its own markers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from qinco_jax.bench import scale
from qinco_jax.bench.harness import DOC, RUNS, log, write_section
from qinco_jax.config import flag

START, END = "<!-- bench_list_search:start -->", "<!-- bench_list_search:end -->"
NPROBE = 64  # lists whose recall is measured


@dataclasses.dataclass(frozen=True)
class ListSearchBench:
  """What `run` measures (flags of experiments/bench_list_search.py)."""
  lists: int = flag(65_536, "recall part: lists (0: no part)")
  rows_per_list: int = flag(4, "recall part: K-means rows per list")
  graphs: tuple[str, ...] = flag(("32x40", "32x100", "32x200"),
                                 "HNSW graphs built, each M x efConstruction")
  ef_search: tuple[int, ...] = flag((16, 32, 64, 128, 256, 512, 1024),
                                    "recall part: efSearch values")
  encode_lists: tuple[int, ...] = flag((65_536,), "encode part: lists (empty: no part)")
  encode_n: int = flag(1000, "encode part: vectors encoded")
  encode_ef: tuple[int, ...] = flag((128, 256), "encode part: encoder efSearch values")
  workdir: str = flag(os.path.join(RUNS, "bench_list_search"), "results")
  doc: str = DOC


def _graphs(specs) -> list[tuple[int, int]]:
  out = []
  for s in specs:
    m, _, ef = str(s).partition("x")
    if not (m.isdigit() and ef.isdigit()):
      raise ValueError(f"a graph is M x efConstruction, e.g. 32x100; got {s!r}")
    out.append((int(m), int(ef)))
  return out


def _built(cents: np.ndarray, M: int, efc: int) -> tuple[Any, float]:
  from qinco_jax.search import coarse
  u0 = scale._usage()
  graph = coarse.build_coarse(cents, "hnsw", ef_construction=efc, hnsw_M=M)
  return graph, scale._usage()["cpu_s"] - u0["cpu_s"]


def recall_part(opts: ListSearchBench) -> dict:
  from qinco_jax.search import coarse
  x = scale._clustered(opts.lists * opts.rows_per_list)
  u0 = scale._usage()
  cents = coarse.two_level_kmeans(x, opts.lists, verbose=False)
  kmeans_s = scale._usage()["cpu_s"] - u0["cpu_s"]
  q = scale._clustered(1000, seed=1).astype(np.float32)
  rows = []
  for M, efc in _graphs(opts.graphs):
    graph, cpu = _built(cents, M, efc)
    u0 = scale._usage()
    rec = coarse.list_search_recall(graph, cents, q, NPROBE, opts.ef_search)
    rows.append({"M": M, "ef_construction": efc, "build_cpu_s": cpu,
                 "recall_at_64": {str(k): v for k, v in rec.items()},
                 "recall_cpu_s": scale._usage()["cpu_s"] - u0["cpu_s"]})
    log(f"M {M} efConstruction {efc}: build {cpu:.1f} CPU s, recall {rec}")
  return {"lists": opts.lists, "rows": len(x), "kmeans_cpu_s": kmeans_s, "graphs": rows}


def encode_part(K: int, opts: ListSearchBench) -> dict:
  from qinco_jax.search import coarse
  n = opts.encode_n
  codec, cents, q = scale.encode_setup(K, n)
  codec.encode(q[:256], verbose=False)  # compile
  u0 = scale._usage()
  full = codec.encode(q, verbose=False)
  out: dict[str, Any] = {"n": n, "exhaustive_vec_per_cpu_s":
                         n / (scale._usage()["cpu_s"] - u0["cpu_s"]), "graphs": []}
  for M, efc in _graphs(opts.graphs):
    graph, cpu = _built(cents, M, efc)
    row: dict[str, Any] = {"M": M, "ef_construction": efc, "build_cpu_s": cpu, "ef": {}}
    for ef in opts.encode_ef:
      fn = coarse.candidates(graph, 4, ef)
      codec.encode(q[:256], verbose=False, ivf_candidates=fn)  # compile
      u0 = scale._usage()
      got = codec.encode(q, verbose=False, ivf_candidates=fn)
      row["ef"][str(ef)] = {"vec_per_cpu_s": n / (scale._usage()["cpu_s"] - u0["cpu_s"]),
                            "same_codes": float((got == full).all(1).mean())}
    log(f"encode at {K} lists, M {M} efConstruction {efc}: {row}")
    out["graphs"].append(row)
  return out


def run(opts: ListSearchBench, command: str) -> None:
  os.makedirs(opts.workdir, exist_ok=True)
  res: dict[str, Any] = {"command": command, "load_before": os.getloadavg()[0],
                         "recall": recall_part(opts) if opts.lists else None,
                         "encode": {str(K): encode_part(K, opts) for K in opts.encode_lists}}
  with open(os.path.join(opts.workdir, "list_search.json"), "w") as f:
    json.dump(res, f, indent=1)
  block = render(res)
  print(block)
  write_section(opts.doc, block, START, END)


def render(res: dict) -> str:
  r = res["recall"] or {"graphs": []}
  efs = list(r["graphs"][0]["recall_at_64"]) if r["graphs"] else []
  lines = [START, "### List search settings (measured)", "",
           f"`{res['command']}` (load average {res['load_before']:.1f} when it started).",
           ""]
  if res["recall"]:
    lines += [f"Recall of the {NPROBE} nearest lists (against exact search, 1,000 queries) "
              f"on two-level K-means centroids at {r['lists']:,} lists ({r['rows']:,} rows "
              "of the clustered uint8 128-d set), per HNSW M x efConstruction and efSearch; "
              "build: CPU seconds of the HNSW build.", "",
              "| M | efConstruction | build: CPU s | "
              + " | ".join(f"ef {e}" for e in efs) + " |", "|---" * (3 + len(efs)) + "|"]
  for g in r["graphs"]:
    lines.append(f"| {g['M']} | {g['ef_construction']} | {g['build_cpu_s']:.1f} | "
                 + " | ".join(f"{g['recall_at_64'][e]:.3f}" for e in efs) + " |")
  for K, e in res["encode"].items():
    lines += ["", f"Encoder at {int(K):,} lists ({e['n']:,} vectors, A = B = 4, sampled-row "
              "centroids as in the encode part above): exhaustive IVF step "
              f"{e['exhaustive_vec_per_cpu_s']:,.0f} vectors/CPU-s; with the B = 4 lists "
              "of the HNSW list search:", "",
              "| M | efConstruction | build: CPU s | encoder efSearch | vectors/CPU-s "
              "| same codes |", "|---|---|---|---|---|---|"]
    for g in e["graphs"]:
      for ef, v in g["ef"].items():
        lines.append(f"| {g['M']} | {g['ef_construction']} | {g['build_cpu_s']:.1f} | {ef} "
                     f"| {v['vec_per_cpu_s']:,.0f} | {v['same_codes']:.3f} |")
  return "\n".join(lines + [END])
