"""Compile for TPU pods and GPU hosts ahead of time: `qinco-compile` (qinco_jax/cli.py)
from a clone.

  python experiments/compile_pods.py --config=qinco2_l --target=v5p-128 --slices=2
  python experiments/compile_pods.py --config=qinco2_s --target=h100x8 --hosts=4
  python experiments/compile_pods.py --install_plugin=tpu   # once, outside your env

Reports per chip: memory (fits or not), the largest batch that fits, FLOPs against
the FLOP model, the collectives of the step and a roofline prediction (docs/pods.md).
"""

from qinco_jax import cli

if __name__ == "__main__":
  cli.compile_pods()
