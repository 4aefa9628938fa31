"""Small QINCo2 on GloVe 6B 50-d, 8 bytes: the README's main job, CPU-sized.

  qinco-train --config=glove_small \
      --workdir=runs/glove

Measured on a 2-core CPU: about 10 minutes in all when the machine is otherwise idle
(RQ initialisation ~40 s; 6 epochs of the 290k training vectors at A=4, B=4;
evaluation at A=8, B=16 on the 90k database plus the faiss RQ baseline). Last run
(29.4 min, 21.4 of them training, sharing the CPU with other jobs): test MSE 2.483,
R@1/10/100 = 0.385/0.851/0.997, next to faiss RQ 8x8 (beam 8, 50k training vectors):
MSE 2.891, 0.344/0.801/0.990 (0.859x the MSE, 1.120x the R@1). An earlier run gave
MSE 2.492 and R@1 0.392; the paper's lr 8e-4 gave MSE 2.576 and R@1 0.377 on the same
recipe.

The recipe for a CPU budget of minutes to an hour (docs/benchmarks.md, "Quality per
CPU-minute", where each choice is measured): L=2, de=64, dh=128, the RQ initialisation,
training at A=4, B=4 with a peak lr of 4e-3 (5x the paper's 8e-4: best of 8e-4, 4e-3
and 1.6e-2 at 3 minutes), evaluation with a wider beam (A=16, B=32 or A=8, B=128).
Deeper (L=4) or wider (de=128, dh=256) models and a wider training beam (A=8, B=8)
cost more per sample and end no better per CPU-minute (L=4 for 30 minutes: MSE 2.2645
against L=2's 2.2666; A=8, B=8 for 10 minutes: 2.4021 against 2.3177).
"""

from qinco_jax.configs import common


def get_config():
  c = common.base("qinco2-S")
  c.model.update(M=8, L=2, de=64, dh=128, A=4, B=4)
  c.train.update(lr=4e-3, epochs=6, warmup_epochs=1, stop_patience=3,
                 batch_per_device=1024)
  c.ds.loop = 290_000  # one epoch = one pass over the 290k training vectors
  c.eval.update(A=8, B=16, rq_beam=8, rq_train=50_000)  # beam 32 RQ: bench_quantizers
  return c
