"""Small QINCo2 on GloVe 6B 50-d, 8 bytes: the README's main job, CPU-sized.

  python experiments/train_bigann.py --config=experiments/configs/glove_small.py \
      --workdir=runs/glove

Expected on a 2-core CPU: about 12-15 minutes in all (RQ init, 6 epochs of 500k samples
at A=4, B=4, evaluation at A=8, B=16 on the 90k database); prints test MSE and
R@1/10/100 next to faiss RQ (beam 32) trained on the same vectors. See
docs/benchmarks.md for the measured figures.
"""

from configs import common


def get_config():
  c = common.base("qinco2-S")
  c.model.update(M=8, L=2, de=64, dh=128, A=4, B=4)
  c.train.update(epochs=5, warmup_epochs=1, stop_patience=3, max_epochs=6,
                 batch_per_device=1024)
  c.ds.loop = 500_000
  c.eval.update(A=8, B=16, rq_beam=8, rq_train=50_000)  # beam 32 RQ: bench_quantizers
  return c
