"""What cross-process collectives cost: training throughput of the same run laid out
as 1 process x N devices and as N processes x 1 device (`qinco_jax.bench.multihost`).
Writes its section of docs/benchmarks.md.

  python experiments/bench_multihost.py                  # GloVe small model, ~5 min on 2 cores
  python experiments/bench_multihost.py --layouts=1x2,2x1,1x1 --epochs=4
  python experiments/bench_multihost.py --help           # every flag
"""

from qinco_jax.bench import harness, multihost

if __name__ == "__main__":
  harness.script_main(multihost.MultihostBench, multihost.run, __file__, __doc__)
