"""Quantizer comparison on GloVe: QINCo2 (trained for a wall-time budget) next to faiss
PQ, OPQ, RQ and LSQ at the same code size, with the rate-distortion plot and the
training throughput (`qinco_jax.bench.quantizers`). Writes its section of
docs/benchmarks.md and docs/rate_distortion.png.

  python experiments/bench_quantizers.py                    # full run (~40 min, 2 cores)
  python experiments/bench_quantizers.py --time_budget_s 3600 --eval_A 8 --eval_B 128
                                                            # the 60-minute budget
  python experiments/bench_quantizers.py --quick            # smoke test (a few minutes;
                                                            # writes under runs/ only)
  python experiments/bench_quantizers.py --help             # every flag (QuantizerBench)
"""

from qinco_jax.bench import harness, quantizers

if __name__ == "__main__":
  harness.script_main(quantizers.QuantizerBench, quantizers.run, __file__, __doc__)
