"""Codec throughput: encode/decode vectors per second, FLOPs and the matmul peak of
qinco2-S and qinco2-L, with the encoder's step breakdown and chunk sweep, next to faiss
RQ (`qinco_jax.bench.codec`). Writes its section of docs/benchmarks.md.

  python experiments/bench_codec.py            # full run (a few minutes on 2 CPU cores)
  python experiments/bench_codec.py --quick    # smoke test (under a minute, no doc)
  python experiments/bench_codec.py --help     # every flag (fields of CodecBench)
"""

from qinco_jax.bench import codec, harness

if __name__ == "__main__":
  harness.script_main(codec.CodecBench, codec.run, __file__, __doc__)
