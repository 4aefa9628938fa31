"""RQ initialisation next to faiss's ResidualQuantizer, and what it does to short
trainings (`qinco_jax.bench.rq_init`). Writes its section of docs/benchmarks.md.

  python experiments/bench_rq_init.py                # init table (~6 min)
  python experiments/bench_rq_init.py --minutes=1,3  # + short trainings (~20 min)
  python experiments/bench_rq_init.py --help         # every flag
"""

from qinco_jax.bench import harness, rq_init

if __name__ == "__main__":
  harness.script_main(rq_init.RQInitBench, rq_init.run, __file__, __doc__)
