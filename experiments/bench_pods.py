"""Pods and GPU hosts by compilation: `qinco-compile` for qinco2-S/M/L on TPU slices
and GPU hosts, tables of memory, collectives and predicted speed in docs/pods.md
(`qinco_jax.bench.pods`).

  python experiments/bench_pods.py                     # every model and target (~1-2 h on 2 cores)
  python experiments/bench_pods.py --models qinco2_s --targets v5e-16 --multi
  python experiments/bench_pods.py --render_only       # rewrite the tables from the saved JSONs
  python experiments/bench_pods.py --help              # every flag
"""

from qinco_jax.bench import harness, pods

if __name__ == "__main__":
  harness.script_main(pods.PodsBench, pods.run, __file__, __doc__)
