"""The paper's qinco2-M recipe on BigANN1M (spec section 10), 8 bytes.

  qinco-train --config=qinco2_m \
      --workdir=runs/qinco2_m --config.data.root=/path/to/bigann

Full recipe: 10M-sample epochs, up to 71 epochs, batch 1024 per device. This needs
accelerators: on a CPU it would take weeks (see docs/benchmarks.md for measured
training throughput). Override e.g. --config.model.M=16 --config.ds.loop=1000000.
Expected result: no reproduction of the paper's numbers has been measured yet.
"""

from qinco_jax.configs import common


def get_config():
  return common.paper("qinco2-M")
