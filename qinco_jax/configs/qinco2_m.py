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
  c = common.base("qinco2-M")
  c.data.name = "bigann"
  c.data.mse_scale = 1e-4
  c.ds.db = 1_000_000
  c.eval.update(A=32, B=64)
  # The paper's length: 3 warm-up + 60 cosine epochs, then 8 at lr ~ 0 (spec 9.6).
  c.train.update(epochs=71, cosine_epochs=60.0)
  return c
