"""Evaluate a trained codec: MSE, per-step MSE, R@1/10/100, codebook usage as JSON.

  python experiments/eval.py --model=runs/glove --A=16 --B=32
  python experiments/eval.py --model=runs/glove --A=8 --B=128 --n_db=10000   # quicker
"""

import json

from absl import app, flags

import qinco_jax as qj
from qinco_jax.evaluate import evaluate

flags.DEFINE_string("model", None, "codec directory (or a training workdir)", required=True)
flags.DEFINE_integer("A", None, "candidates per beam (default: the model's)")
flags.DEFINE_integer("B", None, "beam size (default: the model's)")
flags.DEFINE_string("data", "glove", "glove | synthetic")
flags.DEFINE_integer("n_db", None, "evaluate on the first n_db database vectors only "
                     "(MSE and usage; recall needs the whole database)")


def main(argv):
  del argv
  F = flags.FLAGS
  codec = qj.load(F.model)
  ds = qj.data.load_glove() if F.data == "glove" else qj.data.load_synthetic()
  out = evaluate(codec, ds, A=F.A, B=F.B, n_db=F.n_db, verbose=False)
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  app.run(main)
