"""Search-parameter sweep with Pareto pruning (spec 12.4), logged as resumable JSON lines.

Uses faiss' `OperatingPointsWithRanges`: each parameter is assumed to make search
slower and more accurate as it grows, so a setting whose predicted bounds (the time of
a measured setting below it, the accuracy of one above it) cannot beat the current
Pareto front (R@1 against time per query) is skipped. Settings are visited in faiss'
autotune order: the all-smallest and the all-largest first, then the rest in a fixed
random order, so both bounds become available early (visiting cheapest-first never
yields an accuracy bound, and nothing gets pruned). With `max_experiments` the sweep
is thus a random sample of the grid. Each record holds the parameters, R@1/10/100 and
milliseconds per query per stage; re-running with the same log file skips settings
already measured.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from qinco_jax import metrics
from qinco_jax.search.query import FewerResultsWarning, Searcher, SearchParams

DEFAULT_RANGES: dict[str, Sequence] = {
    "nprobe": [1, 2, 4, 8, 16, 32, 64, 128],
    "ef_search": [16, 32, 64, 128, 256, 512, 1024],  # held when the list search is exact
    "nshort": [1, 2, 4, 10, 20, 50, 100, 200],  # small ones win at high speed
    "nmid_short": [1, 2, 4, 8],
}


def results_asked(p: SearchParams) -> int:
  """Results a sweep asks for with settings p: the re-ranked shortlist (nshort, at most
  100), or 100 when nothing is re-ranked. A search returns at least k results, so
  asking for 100 would re-rank 100 candidates whatever nshort says."""
  return min(p.nshort, 100) if p.use_qinco else 100


def pad_results(I: np.ndarray, k: int = 100) -> np.ndarray:
  """(nq, k') ids -> (nq, k) with -1 after the k' results (R@10 is then R@k')."""
  return np.pad(I, ((0, 0), (0, max(0, k - I.shape[1]))), constant_values=-1)


def read_log(log_path: str | os.PathLike, label: dict | None = None) -> list[dict]:
  """The records of a sweep log whose fields include `label` (all, when None)."""
  if not os.path.exists(log_path):
    return []
  with open(log_path) as f:
    recs = [json.loads(line) for line in f if line.strip()]
  return [r for r in recs if all(r.get(k) == v for k, v in (label or {}).items())]


def run_sweep(searcher: Searcher, queries: np.ndarray, gt: np.ndarray,
              log_path: str | os.PathLike, ranges: dict[str, Sequence] | None = None,
              base: SearchParams = SearchParams(), max_experiments: int | None = None,
              verbose: bool = True, warmup: int = 256,
              clock: Callable[[], float] = time.perf_counter,
              label: dict | None = None) -> list[dict]:
  """Runs the sweep; returns the records of the Pareto-optimal settings. With
  `verbose` each setting is announced before it runs (one can take minutes) and its
  result printed after.

  `label` (e.g. the index's fingerprint) goes into every record written, and only
  records with the same label are reused: a log kept from an earlier index is neither
  reprinted nor taken for this one's (its lines stay in the file).

  `ms_per_query["total"]` is the wall time of the whole search call (every stage plus
  the glue between them), measured after a `warmup`-query call with the same
  parameters (0 = none) so that compiling the decoder is not counted. Each setting asks
  for `results_asked` results, so R@10 and R@100 are R@nshort when nshort is smaller.
  `clock` (seconds) is injectable so that tests can script the timings. With an exact
  (flat) coarse search, ef_search is held at `base.ef_search`.
  """
  from faiss.contrib.evaluation import OperatingPointsWithRanges

  ranges = ranges or DEFAULT_RANGES
  if "ef_search" in ranges and getattr(getattr(searcher, "index", None), "exact_coarse",
                                       False):
    ranges = {**ranges, "ef_search": [base.ef_search]}  # an exact list search ignores it
  op = OperatingPointsWithRanges()
  for name, values in ranges.items():
    op.add_range(name, list(values))
  done = {json.dumps(rec["params"], sort_keys=True): rec for rec in read_log(log_path, label)}
  records = []
  n_run = 0
  n_exp = op.num_experiments()
  for cno in (op.sample_experiments(0) if n_exp > 2 else range(n_exp)):
    key = op.cno_to_key(int(cno))
    params: dict[str, Any] = {k: (int(v) if isinstance(v, (int, np.integer)) else v)
                              for k, v in op.get_parameters(key).items()}
    tag = json.dumps(params, sort_keys=True)
    if tag in done:
      rec = done[tag]
    else:
      if not op.should_run_experiment(key):
        continue
      if max_experiments is not None and n_run >= max_experiments:
        break
      sp = dataclasses.replace(base, **params)
      k = results_asked(sp)
      if verbose:  # a setting can take minutes on a large query set: say what runs
        of = f" of at most {max_experiments}" if max_experiments is not None else ""
        print(f"setting {n_run + 1}{of}: {params} on {len(queries):,} queries ...",
              flush=True)
      with warnings.catch_warnings():  # small nprobe: fewer than 100 results is the point
        warnings.simplefilter("ignore", FewerResultsWarning)
        if warmup:  # compile the decoder for this shortlist size outside the timing
          searcher.search(queries[:warmup], k=k, params=sp)
        t0 = clock()
        _, I, times = searcher.search(queries, k=k, params=sp)
        wall = clock() - t0
      rec = {"params": params, **metrics.recall_at(pad_results(I), gt),
             "ms_per_query": {k: 1e3 * v / len(queries) for k, v in times.items()},
             **(label or {})}
      rec["ms_per_query"]["total"] = 1e3 * wall / len(queries)  # wall time, all stages
      with open(log_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
      n_run += 1
      if verbose:
        print(f"{params}: R@1 {rec['R@1']:.4f} {rec['ms_per_query']['total']:.3f} ms/q",
              flush=True)
    op.add_operating_point(key, rec["R@1"], rec["ms_per_query"]["total"])
    records.append(rec)
  front = {json.dumps(op.get_parameters(k), sort_keys=True, default=int)
           for k, _, _ in op.operating_points}
  return [r for r in records if json.dumps(r["params"], sort_keys=True) in front]
