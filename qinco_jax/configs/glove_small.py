"""Small QINCo2 on GloVe 6B 50-d, 8 bytes: the README's main job, CPU-sized.

  qinco-train --config=glove_small \
      --workdir=runs/glove

Measured on a 2-core CPU: about 10 minutes in all when the machine is otherwise idle
(RQ initialisation ~40 s; 6 epochs of the 290k training vectors at A=4, B=4;
evaluation at A=8, B=16 on the 90k database plus the faiss RQ baseline). Last run
(18 min, sharing the CPU with the test suite): test MSE 2.576, R@1/10/100 =
0.377/0.835/0.995, next to faiss RQ 8x8 (beam 8, 50k training vectors): MSE 2.892,
0.344/0.807/0.990.
"""

from qinco_jax.configs import common


def get_config():
  c = common.base("qinco2-S")
  c.model.update(M=8, L=2, de=64, dh=128, A=4, B=4)
  c.train.update(epochs=6, warmup_epochs=1, stop_patience=3,
                 batch_per_device=1024)
  c.ds.loop = 290_000  # one epoch = one pass over the 290k training vectors
  c.eval.update(A=8, B=16, rq_beam=8, rq_train=50_000)  # beam 32 RQ: bench_quantizers
  return c
