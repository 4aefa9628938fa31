"""Search benchmark on the GloVe default: the IVF-QINCo2 pipeline against faiss IVF-RQ /
IVF-PQ, speed against recall (`qinco_jax.bench.search`). Writes its section of
docs/benchmarks.md and docs/speed_recall.png.

  python experiments/search_bigann.py --workdir=runs/search_glove   # build first
  python experiments/bench_search.py --workdir=runs/search_glove --nq=10000
  python experiments/bench_search.py --workdir=runs/search_glove --lever=fastscan
  python experiments/bench_search.py --help                         # every flag
"""

from qinco_jax.bench import harness, search

if __name__ == "__main__":
  harness.script_main(search.SearchBench, search.run, __file__, __doc__)
