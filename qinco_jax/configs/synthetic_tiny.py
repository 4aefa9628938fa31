"""Seconds-long smoke run on a small synthetic set (used by the tests).

  qinco-train --config=synthetic_tiny \
      --workdir=runs/tiny
"""

from qinco_jax.configs import common


def get_config():
  c = common.base("qinco2-S")
  c.data.name = "synthetic"
  c.model.update(K=16, M=3, L=1, de=16, dh=16, A=4, B=4)
  c.train.update(epochs=3, warmup_epochs=1, stop_patience=2,
                 batch_per_device=128, log_every=5)
  c.ds.update(trainset=2_000, valset=500, db=1_000, loop=1_000)
  c.eval.update(A=4, B=8)
  return c
