"""List search settings at many lists: HNSW build cost, recall of the nearest lists per
efSearch, and the encoder's speed and same-codes fraction per efConstruction and
efSearch (`qinco_jax.bench.list_search`). Writes its block of docs/benchmarks.md.

  python experiments/bench_list_search.py                        # 65,536 lists (minutes)
  python experiments/bench_list_search.py --graphs=32x40,48x100 --encode_lists=
  python experiments/bench_list_search.py --help                 # every flag
"""

from qinco_jax.bench import harness, list_search

if __name__ == "__main__":
  harness.script_main(list_search.ListSearchBench, list_search.run, __file__, __doc__)
