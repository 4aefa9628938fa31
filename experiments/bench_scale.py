"""Scale: peak memory per vector, load time and queries/s of the on-disk lists from 1M to
100M vectors, the coarse quantiser at 65,536 lists and the encoder at 1,024 to 2^20
lists (`qinco_jax.bench.scale`). Writes its section of docs/benchmarks.md.

  python experiments/bench_scale.py                            # every part (hours on 2 cores)
  python experiments/bench_scale.py --parts=lists --sizes=1000000,10000000
  python experiments/bench_scale.py --parts=coarse,encode
  python experiments/bench_scale.py --help                     # every flag
"""

from qinco_jax.bench import harness, scale

if __name__ == "__main__":
  harness.script_main(scale.ScaleBench, scale.run, __file__, __doc__)
